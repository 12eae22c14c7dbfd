"""Faults: broken weights stop a node at start with one FATAL line and exit code 1 (no
traceback); an exception or a CUDA out-of-memory inside inference costs one frame,
which is logged and counted as rejected, and the next frame is processed as usual.

The start-up faults run the nodes' ``main`` in this process (fast: the imports are done)
and, for two of them, as real executables. The inference faults build the node
in-process in an rclpy context of their own and patch its core.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import rclpy
import torch

from conftest import synthetic_frame
from kp_ros.msg import Keypoints, Matches
from kp_ros.nodes import eloftr_node, superpoint_node
from kp_ros.ros.conversions import keypoints_from_msg, matches_from_msg
from ros_helpers import REPO_ROOT, InProcessNode, node_env, parse_counters

NODES = {"superpoint_node": superpoint_node, "eloftr_node": eloftr_node}


# --- broken weights: the node refuses to start -----------------------------------------------

def _truncate_weights(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _garbage_weights(model_dir):
    (model_dir / "model.safetensors").write_bytes(bytes(range(256)) * 8)


# fault -> (how to break a copy of a good model directory, what the FATAL line must name)
FAULTS = {
    "missing directory": (None, "no such directory"),
    "empty directory": (lambda d: [p.unlink() for p in d.iterdir()], "config.json"),
    "config.json garbage": (lambda d: (d / "config.json").write_text("{not json"), "not a valid JSON"),
    "config.json a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "TypeError"),
    "config.json of another model": (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'),
                                     "RuntimeError"),
    "safetensors missing": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "safetensors truncated": (_truncate_weights, "SafetensorError"),
    "safetensors garbage": (_garbage_weights, "SafetensorError"),
}


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_superpoint_dir, tiny_eloftr_dir):
    """{(node, fault): model path} with every fault applied to a copy of the tiny models."""
    root = tmp_path_factory.mktemp("broken_models")
    models = {}
    for node, good in (("superpoint_node", tiny_superpoint_dir), ("eloftr_node", tiny_eloftr_dir)):
        for i, (fault, (breaker, _)) in enumerate(FAULTS.items()):
            target = root / f"{node}_{i}"
            if breaker is not None:
                shutil.copytree(good, target)
                breaker(target)
            models[node, fault] = target
    return models


def fatal_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "FATAL" in line]


def assert_one_clear_fatal(output: str, node: str, model, naming: str) -> None:
    lines = fatal_lines(output)
    assert len(lines) == 1, output
    assert f"[{node}]: cannot start:" in lines[0] and str(model) in lines[0], lines[0]
    assert naming in lines[0], lines[0]
    assert "Traceback" not in output, output


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("node", list(NODES))
def test_broken_weights_stop_the_node_with_one_fatal_line(broken_models, capfd, node, fault):
    model = broken_models[node, fault]
    code = NODES[node].main(["--ros-args", "-p", f"model:={model}", "-p", "device:=cpu"])
    output = "".join(capfd.readouterr())
    assert code == 1, output
    assert_one_clear_fatal(output, node, model, FAULTS[fault][1])


def test_broken_weights_as_real_executables(broken_models):
    """The same through the executables (as ros2 run / launch starts them), in parallel."""
    cases = [("superpoint_node", "safetensors truncated"), ("eloftr_node", "config.json of another model")]
    processes = [subprocess.Popen(
        [sys.executable, "-m", f"kp_ros.nodes.{node}", "--ros-args", "-p",
         f"model:={broken_models[node, fault]}", "-p", "device:=cpu"],
        env=node_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node, fault in cases]
    for process, (node, fault) in zip(processes, cases):
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 1, output
        assert_one_clear_fatal(output, node, broken_models[node, fault], FAULTS[fault][1])


# --- faults inside inference: one frame lost, the node lives on ----------------------------

def fail_once(exception, real):
    """A stand-in for a core method that raises ``exception`` on its first call only."""
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise exception
        return real(*args, **kwargs)
    return patched


def cuda_oom() -> BaseException:
    return torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)")


def assert_shutdown_accounting(output: str, submitted: int, rejected: int) -> None:
    counts = parse_counters(output)
    assert counts["received"] == submitted, counts
    assert counts["received"] == counts["processed"] + counts["dropped"] + counts["rejected"], counts
    assert counts["rejected"] == rejected and counts["dropped"] == 0, counts


@pytest.fixture
def superpoint(tiny_superpoint_dir):
    harness = InProcessNode(superpoint_node.SuperPointNode, "/faults_sp", Keypoints, "keypoints", {
        "model": str(tiny_superpoint_dir), "device": "cpu", "resize": "native", "max_keypoints": 20})
    yield harness
    if rclpy.ok(context=harness.context):
        harness.close()


@pytest.fixture
def eloftr(tiny_eloftr_dir):
    harness = InProcessNode(eloftr_node.EfficientLoFTRNode, "/faults_el", Matches, "matches", {
        "model": str(tiny_eloftr_dir), "device": "cpu", "resize": "native", "match_threshold": 0.0})
    yield harness
    if rclpy.ok(context=harness.context):
        harness.close()


@pytest.mark.parametrize("exception", [RuntimeError("boom in the network"), cuda_oom()],
                         ids=["exception", "cuda_oom"])
def test_superpoint_fault_in_detect_costs_one_frame(superpoint, capfd, exception):
    node = superpoint.node
    node.core.detect = fail_once(exception, node.core.detect)
    failed = superpoint.submit(synthetic_frame(120, 160, seed=1), 10.0)
    counts = node.worker.snapshot()
    assert (counts.received, counts.processed, counts.rejected) == (1, 0, 1), counts
    assert counts.reasons == {f"{type(exception).__name__} during processing": 1}
    good = superpoint.submit(synthetic_frame(120, 160, seed=2), 10.1)
    out = superpoint.output_for(good)
    assert out is not None and out.header == good.header
    assert 0 < len(keypoints_from_msg(out)["scores"]) <= 20
    assert superpoint.output_for(failed, timeout=0.2) is None
    superpoint.close()
    output = "".join(capfd.readouterr())
    rejected = [line for line in output.splitlines() if "frame rejected" in line]
    assert len(rejected) == 1 and type(exception).__name__ in rejected[0] and "ERROR" in rejected[0]
    assert_shutdown_accounting(output, submitted=2, rejected=1)
    assert "Traceback (most recent call last)" in output  # a failure after start-up: where


@pytest.mark.parametrize("method", ["push", "match_features"])
def test_eloftr_oom_costs_one_frame_and_never_mislabels_matches(eloftr, capfd, method):
    """CUDA OOM in ``push`` (before the core caches the frame) or in ``match_features``
    (after it did): the frame is rejected, the stream recovers within a frame, and every
    Matches pairs keypoints0 with the stamp of the frame they really come from."""
    node = eloftr.node
    frames = [synthetic_frame(120, 160, seed=0, shift=(2 * i, i)) for i in range(4)]
    # Distinct frame_ids, so the frame_id0 check below can tell frames apart (issue 13).
    sent = [eloftr.submit(frames[0], 30.0, frame_id="cam0")]
    setattr(node.core, method, fail_once(cuda_oom(), getattr(node.core, method)))
    sent.append(eloftr.submit(frames[1], 30.1, frame_id="cam1"))
    assert node.worker.snapshot().rejected == 1
    sent += [eloftr.submit(frames[2], 30.2, frame_id="cam2"), eloftr.submit(frames[3], 30.3, frame_id="cam3")]
    index = {(m.header.stamp.sec, m.header.stamp.nanosec): i for i, m in enumerate(sent)}
    published = [m for m in (eloftr.output_for(msg, timeout=1.0) for msg in sent[2:]) if m is not None]
    assert eloftr.output_for(sent[3]) is not None, "the stream did not recover"
    for out in published:
        older = index[out.stamp0.sec, out.stamp0.nanosec]
        newer = index[out.header.stamp.sec, out.header.stamp.nanosec]
        assert older != 1, "matched against the frame that failed"
        assert out.frame_id0 == sent[older].header.frame_id
        expected = node.core.match_pair(frames[older], frames[newer])
        got = matches_from_msg(out)
        assert len(got["scores"]) == len(expected["scores"])
        assert np.allclose(got["keypoints0"], expected["keypoints0"])
        assert np.allclose(got["keypoints1"], expected["keypoints1"])
    eloftr.close()
    output = "".join(capfd.readouterr())
    assert "OutOfMemoryError during processing" in output
    assert "Traceback (most recent call last)" in output
    assert_shutdown_accounting(output, submitted=4, rejected=1)


def test_a_run_of_failures_is_logged_throttled_and_the_node_recovers(superpoint, capfd):
    node = superpoint.node
    real = node.core.detect
    node.core.detect = lambda image: (_ for _ in ()).throw(cuda_oom())
    start = time.monotonic()
    for i in range(6):
        superpoint.submit(synthetic_frame(120, 160, seed=i), 40.0 + 0.1 * i)
    elapsed = time.monotonic() - start
    node.core.detect = real
    good = superpoint.submit(synthetic_frame(120, 160, seed=9), 41.0)
    assert superpoint.output_for(good) is not None
    superpoint.close()
    output = "".join(capfd.readouterr())
    logged = [line for line in output.splitlines() if "frame rejected" in line]
    assert 1 <= len(logged) <= 1 + int(elapsed), logged  # at most one line a second
    assert re.search(r"rejected so far: \d+", logged[0])
    assert_shutdown_accounting(output, submitted=7, rejected=6)
    assert "6x OutOfMemoryError during processing" in output


def test_parameters_file_with_a_bad_choice_is_a_clear_start_error(tiny_superpoint_dir, tmp_path, capfd):
    """A YAML parameters file with an invalid value: the same one-line failure."""
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"/**/superpoint_node": {"ros__parameters": {
        "model": str(tiny_superpoint_dir), "device": "cpu", "resize": "huge"}}}))
    code = superpoint_node.main(["--ros-args", "--params-file", str(params)])
    output = "".join(capfd.readouterr())
    assert code == 1
    lines = fatal_lines(output)
    assert len(lines) == 1 and "resize must be one of" in lines[0] and "Traceback" not in output


# --- stopping: SIGINT however it was inherited, and SIGTERM, shut down cleanly ---------------

def _ignore_sigint():
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a `node &` from a script inherits it


@pytest.mark.parametrize("how", ["SIGINT, inherited as ignored", "SIGTERM"])
def test_stop_signals_shut_down_cleanly_with_the_counters(tiny_superpoint_dir, tmp_path, how):
    import signal
    log = tmp_path / "node.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kp_ros.nodes.superpoint_node", "--ros-args", "-p",
             f"model:={tiny_superpoint_dir}", "-p", "device:=cpu", "-r", "__ns:=/stop_test"],
            env=node_env(), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=_ignore_sigint if how.startswith("SIGINT") else None)
    try:
        assert spin_until_file(log, " on /stop_test/image (", 120), log.read_text()  # the start-up line
        process.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "shutting down: received=0" in text and "Traceback" not in text, text


def spin_until_file(path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return True
        time.sleep(0.1)
    return False
