"""kp_ros/core/cpu_heap.py: after a model load, freed large tensors are reused from the
heap (no new page faults per frame); KP_ROS_RETAIN_HEAP=0 leaves malloc as it is.
Each case runs in a fresh interpreter: the setting is process-wide."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, torch
from kp_ros.core.cpu_heap import retain_freed_memory
applied = retain_freed_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(64, 2 ** 20)  # 256 MiB, as a large per-frame feature map
    del block
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
    result = probe(None)
    pages = 256 * 2 ** 20 // 4096
    assert result["applied"] is True
    assert result["faults"][0] > pages // 2  # the first one touches new memory
    # Once the heap has grown to the working set (a step or two), it is reused.
    assert max(result["faults"][-4:]) < pages // 20, result


@pytest.mark.skipif(not glibc(), reason="the heap setting applies to glibc only")
def test_the_switch_leaves_malloc_as_it_is():
    result = probe("0")
    pages = 256 * 2 ** 20 // 4096
    assert result["applied"] is False
    assert min(result["faults"]) > pages // 2, result  # every allocation is a fresh mmap


def test_loading_a_model_applies_it(tiny_superpoint_dir):
    code = ("import json; from kp_ros.core import cpu_heap; from kp_ros.core.superpoint import SuperPointDetector;"
            f"SuperPointDetector({str(tiny_superpoint_dir)!r}, device='cpu');"
            "print(json.dumps(cpu_heap._applied))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "KP_ROS_RETAIN_HEAP"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) is glibc()
