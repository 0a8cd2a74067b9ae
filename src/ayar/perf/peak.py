"""This machine's matmul peak: the yardstick for "% of peak" in benchmarks."""

from __future__ import annotations

import time

import torch


def matmul_gflops(
    dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0, device: str = "cpu"
) -> float:
    """Sustained GFLOP/s of an n x n matmul (2 n^3 flops each), best of the runs that fit in `seconds`."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up (thread pool, kernels)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best
