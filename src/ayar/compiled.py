"""Elementwise torch functions run through torch.compile, with the eager ops as the fallback."""

from __future__ import annotations

import os
import warnings

import torch


class pointwise:
    """A function of elementwise/row-wise torch ops, run compiled (dynamic shapes: one compile serves
    every sequence length) or, where compiling is off (`AYAR_COMPILE=0`) or fails, as is."""

    def __init__(self, fn):
        self.fn, self._compiled, self.failed = fn, None, False

    def __call__(self, *args):
        if self.failed or os.environ.get("AYAR_COMPILE", "1") == "0":
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            return self._compiled(*args)
        except Exception as e:  # no C++ compiler, unsupported platform...: same math, uncompiled
            self.failed = True
            warnings.warn(f"ayar: torch.compile failed for {self.fn.__name__} ({type(e).__name__}); using eager torch ops", stacklevel=2)
            return self.fn(*args)
