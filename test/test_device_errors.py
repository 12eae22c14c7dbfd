"""Sticky device errors: which exceptions mean "the CUDA context is gone", the worker that
stops on one, and a real node process that exits non-zero on one (so respawn restarts it),
all with a fake CUDA error on CPU. An ordinary failure (OOM, a bug, bad input) still costs
one frame only (test_faults.py)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from kp_ros.core.device_errors import (EXIT_DEVICE_FAILED, device_still_works,
                                       is_sticky_device_error, looks_like_cuda_error)
from kp_ros.ros.frame_worker import FrameRejected, LatestFrameWorker

ILLEGAL_ACCESS = ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors "
                  "might be asynchronously reported at some other API call")


def accelerator_error(text: str) -> BaseException:
    return torch.AcceleratorError(text) if hasattr(torch, "AcceleratorError") else RuntimeError(text)


@pytest.mark.parametrize("exc", [
    accelerator_error(ILLEGAL_ACCESS),
    RuntimeError(ILLEGAL_ACCESS),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("CUDA error: misaligned address"),
    RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
], ids=["AcceleratorError", "illegal-access", "assert", "launch-failure", "misaligned",
        "cublas", "cudnn"])
def test_sticky_cuda_errors_are_recognised_by_their_text(exc):
    assert is_sticky_device_error(exc)
    assert is_sticky_device_error(exc, device_works=lambda: True)  # the text decides


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("boom in the network"),
    ValueError("CUDA error: illegal memory access (a ValueError is not CUDA's)"),
    FrameRejected("bad encoding"),
    KeyError("scores"),
], ids=["oom", "runtime", "value", "rejected", "key"])
def test_ordinary_failures_are_not_sticky_and_never_probe(exc):
    def probe():
        raise AssertionError("probed a non-CUDA error")
    assert not is_sticky_device_error(exc, device_works=probe)


def test_an_unlisted_cuda_error_is_sticky_only_when_the_device_fails_the_probe():
    exc = accelerator_error("CUDA error: invalid configuration argument")
    assert looks_like_cuda_error(exc)
    assert not is_sticky_device_error(exc)  # no probe: one frame lost
    assert not is_sticky_device_error(exc, device_works=lambda: True)
    assert is_sticky_device_error(exc, device_works=lambda: False)


def test_the_probe_passes_on_cpu():
    assert device_still_works("cpu") and device_still_works(torch.device("cpu"))


# --- the worker ----------------------------------------------------------------------------

def test_worker_stops_on_a_sticky_error_and_keeps_the_accounting():
    fatal = threading.Event()
    seen = []
    started, gate = threading.Event(), threading.Event()

    def handler(item):
        if item == "first":
            started.set()
            gate.wait(5)
            raise RuntimeError(ILLEGAL_ACCESS)
        seen.append(item)

    worker = LatestFrameWorker(handler, is_fatal=is_sticky_device_error,
                               on_fatal=lambda exc: fatal.set())
    worker.submit("first")
    assert started.wait(5)
    worker.submit("waiting")  # in the slot while "first" fails
    gate.set()
    assert fatal.wait(5)
    assert isinstance(worker.fatal, RuntimeError)
    worker.submit("after")  # the worker is gone: counted as dropped, never processed
    worker.stop()
    counts = worker.snapshot()
    assert seen == []
    assert (counts.received, counts.processed, counts.rejected, counts.dropped) == (3, 0, 1, 2)
    assert counts.received == counts.processed + counts.dropped + counts.rejected + worker.pending
    assert counts.reasons == {"RuntimeError during processing": 1}


def test_worker_lives_on_after_an_ordinary_error():
    calls = []

    def handler(item):
        calls.append(item)
        if item == 0:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    worker = LatestFrameWorker(handler, is_fatal=is_sticky_device_error,
                               on_fatal=lambda exc: pytest.fail("OOM is not sticky"))
    for item in range(3):
        worker.submit(item)
        assert worker.wait_idle(5)
    worker.stop()
    assert calls == [0, 1, 2] and worker.fatal is None
    assert worker.snapshot().rejected == 1


# --- a real node process ---------------------------------------------------------------------

# superpoint_node's main with the core's detect raising a fake sticky CUDA error, and one
# frame handed to the node right after start (as its subscription would).
FAULTY_NODE = textwrap.dedent("""
    import sys
    import numpy as np
    from kp_ros.core.superpoint import SuperPointDetector
    from kp_ros.nodes import superpoint_node
    from kp_ros.ros.conversions import array_to_image_msg
    from kp_ros.ros.feature_node import FeatureNode

    def detect(self, image):
        raise RuntimeError({error!r})

    real_start = FeatureNode.start

    def start(self):
        real_start(self)
        for _ in range(3):
            self.input.on_image(array_to_image_msg(np.zeros((48, 64, 3), np.uint8)))

    SuperPointDetector.detect = detect
    FeatureNode.start = start
    sys.exit(superpoint_node.main(sys.argv[1:]))
""")


def test_a_node_exits_non_zero_on_a_sticky_cuda_error_so_respawn_restarts_it(tiny_superpoint_dir):
    from ros_helpers import REPO_ROOT, node_env
    script = FAULTY_NODE.format(error=ILLEGAL_ACCESS)
    result = subprocess.run(
        [sys.executable, "-c", script, "--ros-args", "-p", f"model:={tiny_superpoint_dir}",
         "-p", "device:=cpu", "-r", "__ns:=/sticky_test"],
        env=node_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_DEVICE_FAILED, output
    fatal = [line for line in output.splitlines() if "FATAL" in line]
    assert len(fatal) == 1 and "illegal memory access" in fatal[0], output
    assert "respawn" in fatal[0]
    assert "shutting down: received=" in output  # the counters are still logged
