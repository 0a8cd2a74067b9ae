"""Process memory: allocator settings for training on CPU, and the process's own peak RSS.

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


# Training's and setup's own peaks: the process's high-water mark is reset where each begins (Linux), and the marks
# read before each reset are kept here, so that `peak_rss_mb` stays the whole process's
_earlier_peak_mb = 0.0
_setup_peak_mb: float | None = None
_training_peak_kept = False


def _reset_high_water() -> bool:
    global _earlier_peak_mb
    _earlier_peak_mb = max(_earlier_peak_mb, _high_water_mb())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def start_of_setup() -> None:
    """A run begins: its setup's peak is measured from here (a process may run several, as HPO's trials)."""
    _reset_high_water()


def start_of_training() -> None:
    """Keep setup's peak RSS apart and reset the process's high-water mark (Linux: /proc/self/clear_refs), so that
    `training_peak_rss_mb` is training's own: the memory planner predicts that. Setup can peak higher on a small run:
    a checkpoint loaded into another dtype has every page of its file mapped while it converts (measured: 1,259 MB
    against training's 1,039 for SmolLM2 from fp32 into bf16 with gradient checkpointing; page cache, reclaimable)."""
    global _setup_peak_mb, _training_peak_kept
    _setup_peak_mb = _high_water_mb()
    _training_peak_kept = _reset_high_water()


def setup_peak_rss_mb() -> float | None:
    return _setup_peak_mb


def training_peak_rss_mb() -> float | None:
    """The peak RSS since `start_of_training` (None where the high-water mark could not be reset)."""
    return _high_water_mb() if _training_peak_kept else None


def peak_rss_mb() -> float:
    """This process's peak RSS in MB since it started, setup's included (Linux: /proc's VmHWM). Not getrusage's
    ru_maxrss: Linux carries into it the RSS of the process that forked this one, at the fork (a run started from the
    web UI, which may hold a chat model, or from a benchmark that built a model, would report that parent's size);
    measured: 2,061 MB for a child of a 2 GB parent whose own high-water mark was 14 MB. Elsewhere, ru_maxrss."""
    return max(_high_water_mb(), _earlier_peak_mb)


def _high_water_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    scale = 1 if platform.system() == "Linux" else 1024  # KiB on Linux, bytes on macOS
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / scale, 1)
