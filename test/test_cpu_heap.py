"""kp_ros/core/cpu_heap.py: after a model load, freed large blocks are reused from the
heap (no new page faults per frame) with KP_ROS_RETAIN_HEAP=1; by default malloc is left as it is.
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
size = 256 * 2 ** 20  # as two large per-frame feature maps
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(2)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def probe(env_switch: str | None) -> dict:
    env = dict(os.environ)
    env.pop("KP_ROS_RETAIN_HEAP", None)
    if env_switch is not None:
        env["KP_ROS_RETAIN_HEAP"] = env_switch
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):
        return False


@pytest.mark.skipif(not glibc(), reason="the heap setting applies to glibc only")
def test_freed_large_tensors_are_reused_without_page_faults():
    result = probe("1")
    pages = 2 * 256 * 2 ** 20 // 4096
    assert result["applied"] is True
    assert result["faults"][0] > pages // 2  # the first round touches new memory
    assert max(result["faults"][1:]) < pages // 20, result  # the next ones reuse it


@pytest.mark.skipif(not glibc(), reason="the heap setting applies to glibc only")
@pytest.mark.parametrize("switch", [None, "0"])
def test_by_default_malloc_is_left_as_it_is(switch):
    result = probe(switch)
    pages = 2 * 256 * 2 ** 20 // 4096
    assert result["applied"] is False
    assert min(result["faults"]) > pages // 2, result  # every allocation is a fresh mmap


def test_loading_a_model_applies_it(tiny_superpoint_dir):
    code = ("import json; from kp_ros.core import cpu_heap; from kp_ros.core.superpoint import SuperPointDetector;"
            f"SuperPointDetector({str(tiny_superpoint_dir)!r}, device='cpu');"
            "print(json.dumps(cpu_heap._applied))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KP_ROS_RETAIN_HEAP": "1"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) is glibc()
