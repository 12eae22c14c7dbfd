"""Keep freed large CPU tensors in the process heap instead of returning them to the OS.

glibc's malloc serves blocks above its mmap threshold (adaptive, at most 32 MiB by
default) with a fresh mmap and unmaps them on free. A matcher's per-frame tensors
(feature maps, similarity blocks: tens to hundreds of MB each) are then new pages every
frame, each zero-filled by the kernel on first touch: about half a million page faults
per EfficientLoFTR step at 640x480, a third of the step's time. With the mmap and trim
thresholds raised, those blocks stay in the heap and the next frame reuses them; the
process keeps its peak resident memory, and the heap can fragment: with differently
sized blocks it grew to several times the working set before it settled, and a
1920x1080 step peaked higher (4.5 vs 3.6 GiB) and was not faster. So it is opt-in:
``KP_ROS_RETAIN_HEAP=1`` in the environment (worth it at 640x480 and below, see
docs/performance.md). Process-wide, applied once when a model is loaded
(model_loading.load_pretrained), only where the C library is glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# Blocks up to this size come from the heap; larger ones (rare: a 1920x1080 float32 map
# of 64 channels is 0.5 GiB) still use mmap. Free heap memory is never trimmed (the
# largest value mallopt takes).
MMAP_THRESHOLD_BYTES = 2 ** 30
TRIM_THRESHOLD_BYTES = 2 ** 31 - 1
ENV_SWITCH = "KP_ROS_RETAIN_HEAP"

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); True when they are set."""
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def _set_thresholds() -> bool:
    if os.environ.get(ENV_SWITCH, "0").strip().lower() not in ("1", "true", "yes", "on"):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr (not Linux)
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the mmap one first, so a refused value leaves both as they were.
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and \
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
