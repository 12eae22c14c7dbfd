"""Keep freed per-frame CPU tensors in the process heap instead of returning them to the OS.

glibc's malloc serves blocks above its mmap threshold (adaptive, at most 32 MiB by
default) with a fresh mmap and unmaps them on free. A model's per-frame tensors (a
640x480 SuperPoint's full-resolution 64-channel maps are 75 MiB each) are then new pages
every frame, each zero-filled by the kernel on first touch: ~60 000 page faults and a
quarter of a SuperPoint frame's time. With the mmap threshold at MMAP_THRESHOLD_BYTES
and trimming off, blocks up to that size stay in the heap and the next frame reuses them;
larger ones (a 1920x1080 frame's half-resolution maps, 128 MiB and up) are still mapped
and unmapped, so a large frame cannot leave the heap fragmented around blocks of its
size (with a 1 GiB threshold a 1920x1080 EfficientLoFTR step peaked at 4.5 instead of
3.6 GiB). The process keeps the heap it has grown to (its peak working set below the
threshold). Process-wide, applied once when a model is loaded
(model_loading.load_pretrained), only where the C library is glibc; KP_ROS_RETAIN_HEAP=0
in the environment leaves malloc as it is. Measured in docs/performance.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# Blocks up to this size come from the heap: 640x480 frames' maps (SuperPoint's 75 MiB),
# not 1920x1080's (EfficientLoFTR's 1/2-resolution maps: 127.5 MiB, with 128 MiB the
# 1920x1080 step peaked 0.26 GiB higher than with glibc's default, with 96 MiB 0.06 GiB).
# Free heap memory is never trimmed (the largest value mallopt takes).
MMAP_THRESHOLD_BYTES = 96 * 2 ** 20
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
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
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
