"""Process memory allocator settings for training on CPU.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB), after which
tensors of a few MB are carved from the heap, where freed space fragments and is never returned: the
process's peak RSS then runs far above the memory training actually holds (measured on a 135M model:
6.2 GB peak RSS for 3.1 GB live, benchmarks/README.md). A fixed threshold keeps every tensor above it
in its own mapping, returned to the system when freed. That costs speed (each new mapping is zeroed
and faulted in page by page: 30 % slower training measured on a 2-core VM), so training turns it on
only when memory is tight (`training.return_memory`).
"""

from __future__ import annotations

import ctypes
import platform

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, held fixed


def tune_allocator() -> str | None:
    """Fix glibc's mmap threshold for this process. Returns what was set, or None where it does not apply
    (not Linux with glibc: other allocators behave differently and are left alone)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) != 1:
            return None
    except (OSError, AttributeError):
        return None
    return f"glibc mmap threshold fixed at {THRESHOLD_BYTES // 1024} KiB"
