"""eloftr_node in its own process, fed a frame sequence over DDS (lockstep): one Matches
per frame after the first, pairing the newer frame's header with the older one's
stamp/frame_id; stream resets on backwards stamps, gaps and size changes; runtime
parameters; bad input counted; accounting holds at shutdown."""
import numpy as np
import pytest
from sensor_msgs.msg import Image

from conftest import synthetic_frame
from kp_ros.msg import Matches
from kp_ros.ros.conversions import matches_from_msg
from ros_helpers import NodeHarness, parse_counters, ros_node, spin_until, start_node, stop_node

NODE = "/el_test/eloftr_node"


@pytest.fixture(scope="module")
def running(tiny_eloftr_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("eloftr_node") / "node.log"
    process = start_node("eloftr_node", namespace="/el_test", log_path=log,
                         params={"model": str(tiny_eloftr_dir), "device": "cpu", "resize": "native",
                                 # random weights: confidences ~1e-4, so keep every mutual NN
                                 "match_threshold": 0.0, "diagnostics_period": 0.2},
                         remaps={"image": "/el_test/camera/image_raw"})
    with ros_node("el_test_driver") as (node, executor):
        harness = NodeHarness(node, executor, "/el_test/camera/image_raw", Matches, "/el_test/matches")
        assert harness.wait_ready(90, NODE), f"node never subscribed:\n{log.read_text()}"
        harness.published = 0
        yield harness, process, log
        stop_node(process)


def feed(harness, image, stamp, expect_matches: bool, frame_id="camera"):
    """Publish one frame, wait until the node has processed it, return its Matches or None."""
    processed = harness.counters(NODE).get("processed", 0)
    seen = len(harness.outputs)
    msg = harness.publish_frame(image, stamp, frame_id=frame_id)
    harness.published += 1

    def new_output():
        return next((m for m in harness.outputs[seen:] if m.header.stamp == msg.header.stamp), None)
    if expect_matches:
        spin_until(harness.executor, lambda: new_output() is not None, 30)
        assert new_output() is not None, f"no Matches for stamp {stamp}"
        return msg, new_output()
    counts = harness.wait_counters(NODE, lambda c: c.get("processed", 0) > processed)
    assert counts["processed"] > processed, f"frame {stamp} not processed: {counts}"
    spin_until(harness.executor, lambda: new_output() is not None, 0.3)
    assert new_output() is None, "a frame that starts a stream must not be matched"
    return msg, None


def frames(n, start_seed=0):
    return [synthetic_frame(120, 160, seed=start_seed, shift=(3 * i, 2 * i)) for i in range(n)]


def test_matches_pair_consecutive_frames(running):
    harness, _, _ = running
    previous = None
    for i, image in enumerate(frames(5)):
        msg, out = feed(harness, image, 10.0 + 0.1 * i, expect_matches=i > 0, frame_id=f"cam_{i}")
        if i:
            assert out.header == msg.header
            assert out.stamp0 == previous.header.stamp and out.frame_id0 == previous.header.frame_id
            assert (out.height, out.width) == (120, 160)
            m = matches_from_msg(out)
            n = len(m["scores"])  # random weights: few mutual NNs, possibly none
            assert len(m["keypoints0"]) == len(m["keypoints1"]) == n and len(m["inliers"]) == 0
            for pts in (m["keypoints0"], m["keypoints1"]):
                assert (pts >= 0).all() and (pts[:, 0] < 160).all() and (pts[:, 1] < 120).all()
        previous = msg


@pytest.mark.parametrize("jump,reason", [(-5.0, "backwards"), (0.0, "repeated"), (10.0, "gap > max_frame_gap")])
def test_stream_resets(running, jump, reason):
    harness, _, _ = running
    seq = frames(3, start_seed=1)
    base = 100.0 + 100 * (jump + 10)  # far from the previous test's stamps: a reset too
    feed(harness, seq[0], base, expect_matches=False)
    feed(harness, seq[1], base + 0.1, expect_matches=True)
    reset_msg, _ = feed(harness, seq[2], base + 0.1 + jump, expect_matches=False)
    _, out = feed(harness, seq[0], base + 0.2 + jump, expect_matches=True)
    assert out.stamp0 == reset_msg.header.stamp  # matched against the frame that reset


def test_size_change_resets(running):
    harness, _, _ = running
    feed(harness, synthetic_frame(120, 160, seed=4), 5000.0, expect_matches=False)
    feed(harness, synthetic_frame(120, 160, seed=4, shift=(2, 1)), 5000.1, expect_matches=True)
    feed(harness, synthetic_frame(96, 128, seed=4), 5000.2, expect_matches=False)
    _, out = feed(harness, synthetic_frame(96, 128, seed=4, shift=(2, 1)), 5000.3, expect_matches=True)
    assert (out.height, out.width) == (96, 128)


def test_runtime_parameters_take_effect_on_the_next_frame(running):
    harness, _, _ = running
    # A frame matched with itself gives the random-weight model its most mutual NNs (>= 2).
    image = synthetic_frame(120, 160, seed=0)
    feed(harness, image, 6000.0, expect_matches=False)
    _, out = feed(harness, image, 6000.1, expect_matches=True)
    n = len(out.x0)
    assert n >= 2 and len(out.inliers) == 0
    assert harness.set_params(NODE, {"max_matches": 1, "geometric_verification": "homography"})[0].successful
    _, out = feed(harness, image, 6000.2, expect_matches=True)
    assert len(out.x0) == 1 and len(out.inliers) == 1  # flags present once verification is on
    assert harness.set_params(NODE, {"max_matches": 2048, "geometric_verification": "none"})[0].successful
    _, out = feed(harness, image, 6000.3, expect_matches=True)
    assert len(out.x0) == n and len(out.inliers) == 0
    result = harness.set_params(NODE, {"geometric_verification": "affine"})[0]
    assert not result.successful and "one of" in result.reason
    result = harness.set_params(NODE, {"model": "x/y"})[0]
    assert not result.successful and "cannot change while running" in result.reason


def test_essential_verification_with_camera_info(running):
    from sensor_msgs.msg import CameraInfo
    from kp_ros.ros.qos import output_qos
    harness, _, log = running
    image = synthetic_frame(120, 160, seed=0)
    assert harness.set_params(NODE, {"geometric_verification": "essential"})[0].successful
    feed(harness, image, 6500.0, expect_matches=False)
    _, out = feed(harness, image, 6500.1, expect_matches=True)  # no camera_info yet: fundamental
    assert len(out.inliers) == len(out.x0)
    assert spin_until(harness.executor, lambda: "no camera_info" in log.read_text(), 10)
    info_pub = harness.node.create_publisher(CameraInfo, "/el_test/camera_info", output_qos())
    info = CameraInfo(width=160, height=120, distortion_model="plumb_bob",
                      k=[100.0, 0, 80, 0, 100.0, 60, 0, 0, 1], d=[-0.1, 0.01, 0.0, 0.0, 0.0])
    spin_until(harness.executor, lambda: info_pub.get_subscription_count() >= 1, 10)
    info_pub.publish(info)
    assert spin_until(harness.executor, lambda: "camera_info: 160x120, plumb_bob" in log.read_text(), 10)
    _, out = feed(harness, image, 6500.2, expect_matches=True)
    assert len(out.inliers) == len(out.x0)
    assert harness.set_params(NODE, {"geometric_verification": "none"})[0].successful
    harness.node.destroy_publisher(info_pub)


def test_bad_input_is_rejected_counted_and_the_node_lives_on(running):
    harness, _, _ = running
    before = harness.wait_counters(NODE, lambda c: c.get("received") == harness.published)
    for i, msg in enumerate([Image(height=4, width=4, encoding="32FC1", step=16, data=bytes(64)),
                             Image(height=8, width=8, encoding="bgr8", step=20, data=bytes(160))]):
        harness.publish(msg)
        harness.published += 1
        harness.wait_counters(NODE, lambda c: c.get("rejected") == before["rejected"] + i + 1)
    assert harness.counters(NODE)["rejected"] == before["rejected"] + 2
    feed(harness, synthetic_frame(120, 160, seed=9), 7000.0, expect_matches=False)
    feed(harness, synthetic_frame(120, 160, seed=9, shift=(1, 1)), 7000.1, expect_matches=True)


def test_accounting_at_shutdown(running):
    harness, process, log = running
    stop_node(process)
    text = log.read_text()
    counts = parse_counters(text)
    assert counts["received"] == harness.published
    assert counts["received"] == counts["processed"] + counts["dropped"] + counts["rejected"]
    assert counts["rejected"] == 2
    assert "stream reset" in text and process.returncode == 0 and "Traceback" not in text, text
