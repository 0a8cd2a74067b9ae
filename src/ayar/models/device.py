"""Device and dtype choice. `auto` follows the hardware; the choice and its reason are recorded in the run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: torch.dtype
    reason: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX), where bf16 is faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    dev = choose_device(device)
    if dtype != "auto":
        return Placement(dev, _DTYPES[dtype], f"{dtype} as configured")
    if dev == "cuda":
        if torch.cuda.is_bf16_supported():
            return Placement(dev, torch.bfloat16, "auto: this GPU supports bf16")
        return Placement(dev, torch.float16, "auto: this GPU has no bf16, using fp16")
    if dev == "mps":
        return Placement(dev, torch.float16, "auto: fp16 on Apple GPU")
    if cpu_supports_bf16():
        return Placement(dev, torch.bfloat16, "auto: this CPU has native bf16 (AVX512-BF16/AMX)")
    return Placement(dev, torch.float32, "auto: this CPU has no native bf16, using fp32")
