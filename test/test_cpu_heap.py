"""kp_ros/core/cpu_heap.py: after a model load, freed per-frame blocks (up to the threshold)
are reused from the heap, no new page faults per frame; larger ones are still mapped and
unmapped; KP_ROS_RETAIN_HEAP=0 leaves malloc as it is.
Each case runs in a fresh interpreter: the setting is process-wide. (What it saves in a
matcher step, bench/bench_eloftr_scaling.py reports.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, resource
from kp_ros.core.cpu_heap import retain_freed_memory
applied = retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
faults = {}
for name, size in (("small", SMALL), ("large", LARGE)):
    faults[name] = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(size) for _ in range(2)]
        for block in blocks:
            ctypes.memset(block, 1, size)
        for block in blocks:
            libc.free(block)
        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""
SMALL = 64 * 2 ** 20  # two per-frame maps of a 640x480 frame, below the threshold
LARGE = 256 * 2 ** 20  # two of a large frame, above it


def probe(env_switch: str | None) -> dict:
    env = dict(os.environ)
    env.pop("KP_ROS_RETAIN_HEAP", None)
    if env_switch is not None:
        env["KP_ROS_RETAIN_HEAP"] = env_switch
    code = f"SMALL, LARGE = {SMALL}, {LARGE}\n" + PROBE
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):
        return False


@pytest.mark.skipif(not glibc(), reason="the heap setting applies to glibc only")
@pytest.mark.parametrize("switch", [None, "1"])
def test_freed_per_frame_blocks_are_reused_without_page_faults(switch):
    result = probe(switch)
    assert result["applied"] is True
    small, large = 2 * SMALL // 4096, 2 * LARGE // 4096  # pages per round
    assert result["faults"]["small"][0] > small // 2  # the first round touches new memory
    assert max(result["faults"]["small"][1:]) < small // 20, result  # the next ones reuse it
    # Above the threshold every round is a fresh mapping: such blocks do not stay.
    assert min(result["faults"]["large"]) > large // 2, result


@pytest.mark.skipif(not glibc(), reason="the heap setting applies to glibc only")
def test_switched_off_malloc_is_left_as_it_is():
    result = probe("0")
    assert result["applied"] is False
    small = 2 * SMALL // 4096
    assert min(result["faults"]["small"]) > small // 2, result  # every allocation is a fresh mmap


def test_loading_a_model_applies_it(tiny_superpoint_dir):
    code = ("import json; from kp_ros.core import cpu_heap; from kp_ros.core.superpoint import SuperPointDetector;"
            f"SuperPointDetector({str(tiny_superpoint_dir)!r}, device='cpu');"
            "print(json.dumps(cpu_heap._applied))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "KP_ROS_RETAIN_HEAP"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) is glibc()
