"""Liger's Triton kernels on CUDA (the `liger` extra): RMSNorm, RoPE, SwiGLU/GeGLU and the rest Liger patches into
a transformers model of a family it knows, in place of ayar's CPU kernels, which are off on GPUs. The loss stays
ayar's (training/loss.py: the head only on trained positions, chunked), so Liger's cross-entropy kernels are not
applied. Not yet run on a GPU: what is tested is when it applies and what it is asked to patch."""

from __future__ import annotations

import importlib.util

from ayar.kernels import base_model


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def applies(device: str, is_installed: bool | None = None) -> bool:
    """On CUDA with liger-kernel installed (its kernels are Triton: GPUs only)."""
    return device.startswith("cuda") and (installed() if is_installed is None else is_installed)


def apply(model) -> None:
    """Patch the model's modules with Liger's kernels (in place); the loss is left to ayar."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=base_model(model), cross_entropy=False, fused_linear_cross_entropy=False)
