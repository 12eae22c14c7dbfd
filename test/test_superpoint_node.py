"""superpoint_node in its own process, fed frames over DDS by the test (lockstep, so no
frame is dropped): one Keypoints per frame with the image's header, empty messages for
uniform images, runtime max_keypoints, bad input rejected and counted, node alive.
Each test stands alone, in any order: the module's node is reset to its start-up
parameters before each test, counters are read as deltas, and the shutdown test runs a
node of its own."""
import contextlib

import numpy as np
import pytest
from sensor_msgs.msg import Image

from conftest import synthetic_frame
from kp_ros.msg import Keypoints
from kp_ros.ros.conversions import keypoints_from_msg
from ros_helpers import NodeHarness, parse_counters, ros_node, spin_until, start_node, stop_node

NODE = "/sp_test/superpoint_node"
PARAMS = {"device": "cpu", "max_keypoints": 40, "keypoint_threshold": 0.005, "diagnostics_period": 0.2}
RUNTIME = ("max_keypoints", "keypoint_threshold")  # what tests change while it runs


@contextlib.contextmanager
def superpoint_node(model_dir, log, namespace):
    """A superpoint_node process in ``namespace`` and the test's harness, discovery done."""
    process = start_node("superpoint_node", namespace=namespace, log_path=log,
                         params={"model": str(model_dir), **PARAMS},
                         remaps={"image": f"{namespace}/camera/image_raw"})
    try:
        with ros_node(f"{namespace.strip('/')}_driver") as (node, executor):
            harness = NodeHarness(node, executor, f"{namespace}/camera/image_raw", Keypoints,
                                  f"{namespace}/keypoints")
            assert harness.wait_ready(90, f"{namespace}/superpoint_node"), \
                f"node never subscribed:\n{log.read_text()}"
            harness.published = 0
            yield harness, process
    finally:
        stop_node(process)


@pytest.fixture(scope="module")
def shared_node(tiny_superpoint_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("sp_node") / "node.log"
    with superpoint_node(tiny_superpoint_dir, log, "/sp_test") as (harness, process):
        yield harness, process, log


@pytest.fixture
def running(shared_node):
    """The module's node with its start-up parameters, whatever the test before changed:
    each test sees the same node state in any order."""
    harness = shared_node[0]
    results = harness.set_params(NODE, {name: PARAMS[name] for name in RUNTIME})
    assert all(r.successful for r in results), [r.reason for r in results]
    return shared_node


def feed(harness, image, stamp, **kw):
    seen = len(harness.outputs)
    msg = harness.publish_frame(image, stamp, **kw)
    harness.published += 1

    def new_output():  # only this frame's: a stamp may recur in another test
        return next((m for m in harness.outputs[seen:] if m.header.stamp == msg.header.stamp), None)
    spin_until(harness.executor, lambda: new_output() is not None, 30)
    assert new_output() is not None, f"no Keypoints for stamp {stamp}"
    return msg, new_output()


def test_one_keypoints_per_frame_with_the_image_header(running):
    harness, _, _ = running
    for i in range(4):
        image = synthetic_frame(120, 160, seed=i)
        msg, out = feed(harness, image, 100.0 + i * 0.1, frame_id=f"cam_{i}")
        assert out.header == msg.header
        assert (out.height, out.width, out.descriptor_size) == (120, 160, 256)
        features = keypoints_from_msg(out)
        assert 0 < len(features["scores"]) <= 40
        assert (features["keypoints"] >= 0).all()
        assert (features["keypoints"][:, 0] < 160).all() and (features["keypoints"][:, 1] < 120).all()
        assert np.allclose(np.linalg.norm(features["descriptors"], axis=1), 1, atol=1e-4)


def test_real_frames(running, tum_frames):
    harness, _, _ = running
    for i, frame in enumerate(tum_frames[:2]):
        msg, out = feed(harness, frame, 200.0 + i, frame_id="tum")
        assert (out.height, out.width) == (480, 640) and out.header == msg.header
        assert len(out.x) == 40  # a textured real frame has far more than max_keypoints


def test_uniform_image_and_empty_results_give_valid_messages(running):
    harness, _, _ = running
    # Random weights do not promise zero detections on a flat image (trained ones do):
    # the message must be consistent whatever N is.
    _, out = feed(harness, np.full((120, 160), 128, np.uint8), 300.0)
    assert len(out.x) == len(out.y) == len(out.scores) == len(out.descriptors) // 256
    # N = 0: random weights give scores ~0.05, far below 0.99.
    assert harness.set_params(NODE, {"keypoint_threshold": 0.99})[0].successful
    _, out = feed(harness, synthetic_frame(120, 160, seed=5), 301.0)
    assert len(out.x) == len(out.scores) == len(out.descriptors) == 0
    assert out.descriptor_size == 256 and (out.height, out.width) == (120, 160)
    assert harness.set_params(NODE, {"keypoint_threshold": 0.005})[0].successful


def test_max_keypoints_set_at_runtime_changes_the_next_message(running):
    harness, _, _ = running
    image = synthetic_frame(120, 160, seed=11)
    results = harness.set_params(NODE, {"max_keypoints": 7})
    assert results[0].successful, results[0].reason
    _, out = feed(harness, image, 400.0)
    assert len(out.x) == 7
    scores = np.asarray(out.scores)
    assert (np.diff(scores) <= 0).all(), "top-k by score, best first"
    assert harness.set_params(NODE, {"max_keypoints": 40})[0].successful
    _, out = feed(harness, image, 401.0)
    assert len(out.x) > 7


@pytest.mark.parametrize("name,value,reason", [
    ("keypoint_threshold", 2.0, ""), ("resize", "huge", "resize must be one of"),
    ("model", "other/model", "cannot change while running"), ("device", "cuda", "cannot change")])
def test_invalid_or_fixed_parameters_are_rejected_with_a_reason(running, name, value, reason):
    harness, _, _ = running
    result = harness.set_params(NODE, {name: value})[0]
    assert not result.successful
    assert reason in result.reason


def test_bad_input_is_rejected_counted_and_the_node_lives_on(running):
    harness, _, _ = running
    before = harness.wait_counters(NODE, lambda c: c.get("received") == harness.published)
    bad = [
        Image(height=4, width=4, encoding="yuv422", step=8, data=bytes(32)),
        Image(height=8, width=8, encoding="rgb8", step=24, data=bytes(10)),  # truncated
        Image(height=0, width=0, encoding="mono8", step=0, data=b""),
    ]
    for i, msg in enumerate(bad):
        msg.header.stamp.sec = 500 + i
        harness.publish(msg)
        harness.published += 1
        harness.wait_counters(NODE, lambda c: c.get("rejected") == before["rejected"] + i + 1)
    after = harness.counters(NODE)
    assert after["rejected"] == before["rejected"] + 3, after
    feed(harness, synthetic_frame(120, 160, seed=3), 600.0)  # still alive and processing


def test_accounting_at_shutdown(tiny_superpoint_dir, tmp_path):
    """A node of its own (the module's keeps running for the other tests), fed good and bad
    frames in lockstep, then stopped: its shutdown line counts exactly what it was sent."""
    log = tmp_path / "node.log"
    with superpoint_node(tiny_superpoint_dir, log, "/sp_acct") as (harness, process):
        fqn = "/sp_acct/superpoint_node"
        feed(harness, synthetic_frame(120, 160, seed=1), 800.0)
        harness.publish(Image(height=8, width=8, encoding="rgb8", step=24, data=bytes(10)))  # truncated
        harness.published += 1
        counts = harness.wait_counters(fqn, lambda c: c.get("rejected") == 1)
        assert counts["rejected"] == 1, counts
        feed(harness, synthetic_frame(120, 160, seed=2), 801.0)
        stop_node(process)
    text = log.read_text()
    counts = parse_counters(text)
    assert counts["received"] == harness.published == 3
    assert counts == {"received": 3, "processed": 2, "dropped": 0, "rejected": 1}, counts
    assert process.returncode == 0 and "Traceback" not in text, text
