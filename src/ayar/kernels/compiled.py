"""Elementwise torch functions run through torch.compile, with the eager ops as the fallback."""

from __future__ import annotations

import os
import warnings

import torch


def _detached(a):
    if isinstance(a, torch.Tensor):
        return a.detach()
    return type(a)(_detached(x) for x in a) if isinstance(a, (list, tuple)) else a


class pointwise:
    """A function of elementwise/row-wise torch ops, run compiled (dynamic shapes: one compile serves
    every sequence length) or, where compiling is off (`AYAR_COMPILE=0`) or fails, as is.

    For the insides of autograd Functions (which do their own gradients): it runs without autograd, on
    detached inputs, so grad mode and inputs' requires_grad never make torch compile another variant
    (enough variants reach torch's recompile limit, after which it runs eager)."""

    def __init__(self, fn):
        self.fn, self._compiled, self.failed = fn, None, False

    @torch.no_grad()
    def __call__(self, *args):
        if self.failed or os.environ.get("AYAR_COMPILE", "1") == "0":
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            return self._compiled(*_detached(args))
        except Exception as e:  # no C++ compiler, unsupported platform...: same math, uncompiled
            self.failed = True
            warnings.warn(
                f"ayar: torch.compile failed for {self.fn.__name__} ({type(e).__name__}); using eager torch ops",
                stacklevel=2,
            )
            return self.fn(*args)
