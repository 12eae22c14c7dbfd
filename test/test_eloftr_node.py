"""eloftr_node in its own process, fed a frame sequence over DDS (lockstep): one Matches
per frame after the first, pairing the newer frame's header with the older one's
stamp/frame_id; stream resets on backwards stamps, gaps and size changes; runtime
parameters; bad input counted; accounting holds at shutdown.
Each test stands alone, in any order: it starts its own stream (stream_start), the
module's node is reset to its start-up parameters before each test, counters are read
as deltas, and the shutdown test runs a node of its own."""
import contextlib

import pytest
from sensor_msgs.msg import Image

from conftest import synthetic_frame
from kp_ros.msg import Matches
from kp_ros.ros.conversions import matches_from_msg
from ros_helpers import NodeHarness, parse_counters, ros_node, spin_until, start_node, stop_node

NODE = "/el_test/eloftr_node"


# random weights: confidences ~1e-4, so keep every mutual NN
PARAMS = {"device": "cpu", "resize": "native", "match_threshold": 0.0, "max_matches": 2048,
          "geometric_verification": "none", "diagnostics_period": 0.2}
RUNTIME = ("match_threshold", "max_matches", "geometric_verification")  # what tests change


@contextlib.contextmanager
def eloftr_node(model_dir, log, namespace):
    """An eloftr_node process in ``namespace`` and the test's harness, discovery done."""
    process = start_node("eloftr_node", namespace=namespace, log_path=log,
                         params={"model": str(model_dir), **PARAMS},
                         remaps={"image": f"{namespace}/camera/image_raw"})
    try:
        with ros_node(f"{namespace.strip('/')}_driver") as (node, executor):
            harness = NodeHarness(node, executor, f"{namespace}/camera/image_raw", Matches,
                                  f"{namespace}/matches")
            assert harness.wait_ready(90, f"{namespace}/eloftr_node"), \
                f"node never subscribed:\n{log.read_text()}"
            harness.published = 0
            harness.fqn = f"{namespace}/eloftr_node"
            harness.last_stamp = 0.0
            yield harness, process
    finally:
        stop_node(process)


@pytest.fixture(scope="module")
def shared_node(tiny_eloftr_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("eloftr_node") / "node.log"
    with eloftr_node(tiny_eloftr_dir, log, "/el_test") as (harness, process):
        yield harness, process, log


@pytest.fixture
def running(shared_node):
    """The module's node with its start-up parameters, whatever the test before changed."""
    harness = shared_node[0]
    results = harness.set_params(NODE, {name: PARAMS[name] for name in RUNTIME})
    assert all(r.successful for r in results), [r.reason for r in results]
    return shared_node


def stream_start(harness) -> float:
    """A stamp 100 s after every stamp the node has been sent (more than max_frame_gap,
    1.5 s): a frame there starts a new stream whatever ran before, or if nothing did."""
    return float(int(harness.last_stamp) + 100)


def feed(harness, image, stamp, expect_matches: bool, frame_id="camera"):
    """Publish one frame, wait until the node has processed it, return its Matches or None."""
    processed = harness.counters(harness.fqn).get("processed", 0)
    seen = len(harness.outputs)
    msg = harness.publish_frame(image, stamp, frame_id=frame_id)
    harness.published += 1
    harness.last_stamp = max(harness.last_stamp, stamp)

    def new_output():
        return next((m for m in harness.outputs[seen:] if m.header.stamp == msg.header.stamp), None)
    if expect_matches:
        spin_until(harness.executor, lambda: new_output() is not None, 30)
        assert new_output() is not None, f"no Matches for stamp {stamp}"
        return msg, new_output()
    counts = harness.wait_counters(harness.fqn, lambda c: c.get("processed", 0) > processed)
    assert counts["processed"] > processed, f"frame {stamp} not processed: {counts}"
    spin_until(harness.executor, lambda: new_output() is not None, 0.3)
    assert new_output() is None, "a frame that starts a stream must not be matched"
    return msg, None


def frames(n, start_seed=0):
    return [synthetic_frame(120, 160, seed=start_seed, shift=(3 * i, 2 * i)) for i in range(n)]


def test_matches_pair_consecutive_frames(running):
    harness, _, _ = running
    previous, t0 = None, stream_start(harness)
    for i, image in enumerate(frames(5)):
        msg, out = feed(harness, image, t0 + 0.1 * i, expect_matches=i > 0, frame_id=f"cam_{i}")
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
    base = stream_start(harness)
    feed(harness, seq[0], base, expect_matches=False)
    feed(harness, seq[1], base + 0.1, expect_matches=True)
    reset_msg, _ = feed(harness, seq[2], base + 0.1 + jump, expect_matches=False)
    _, out = feed(harness, seq[0], base + 0.2 + jump, expect_matches=True)
    assert out.stamp0 == reset_msg.header.stamp  # matched against the frame that reset


def test_size_change_resets(running):
    harness, _, _ = running
    t0 = stream_start(harness)
    feed(harness, synthetic_frame(120, 160, seed=4), t0, expect_matches=False)
    feed(harness, synthetic_frame(120, 160, seed=4, shift=(2, 1)), t0 + 0.1, expect_matches=True)
    feed(harness, synthetic_frame(96, 128, seed=4), t0 + 0.2, expect_matches=False)
    _, out = feed(harness, synthetic_frame(96, 128, seed=4, shift=(2, 1)), t0 + 0.3, expect_matches=True)
    assert (out.height, out.width) == (96, 128)


def test_runtime_parameters_take_effect_on_the_next_frame(running):
    harness, _, _ = running
    # A frame matched with itself gives the random-weight model its most mutual NNs (>= 2).
    image, t0 = synthetic_frame(120, 160, seed=0), stream_start(harness)
    feed(harness, image, t0, expect_matches=False)
    _, out = feed(harness, image, t0 + 0.1, expect_matches=True)
    n = len(out.x0)
    assert n >= 2 and len(out.inliers) == 0
    assert harness.set_params(NODE, {"max_matches": 1, "geometric_verification": "homography"})[0].successful
    _, out = feed(harness, image, t0 + 0.2, expect_matches=True)
    assert len(out.x0) == 1 and len(out.inliers) == 1  # flags present once verification is on
    assert harness.set_params(NODE, {"max_matches": 2048, "geometric_verification": "none"})[0].successful
    _, out = feed(harness, image, t0 + 0.3, expect_matches=True)
    assert len(out.x0) == n and len(out.inliers) == 0
    result = harness.set_params(NODE, {"geometric_verification": "affine"})[0]
    assert not result.successful and "one of" in result.reason
    result = harness.set_params(NODE, {"model": "x/y"})[0]
    assert not result.successful and "cannot change while running" in result.reason


def test_essential_verification_with_camera_info(running):
    from sensor_msgs.msg import CameraInfo
    from kp_ros.ros.qos import output_qos
    harness, _, log = running
    image, t0 = synthetic_frame(120, 160, seed=0), stream_start(harness)
    assert harness.set_params(NODE, {"geometric_verification": "essential"})[0].successful
    feed(harness, image, t0, expect_matches=False)
    _, out = feed(harness, image, t0 + 0.1, expect_matches=True)  # no camera_info yet: fundamental
    assert len(out.inliers) == len(out.x0)
    assert spin_until(harness.executor, lambda: "no camera_info" in log.read_text(), 10)
    info_pub = harness.node.create_publisher(CameraInfo, "/el_test/camera_info", output_qos())
    info = CameraInfo(width=160, height=120, distortion_model="plumb_bob",
                      k=[100.0, 0, 80, 0, 100.0, 60, 0, 0, 1], d=[-0.1, 0.01, 0.0, 0.0, 0.0])
    spin_until(harness.executor, lambda: info_pub.get_subscription_count() >= 1, 10)
    info_pub.publish(info)
    assert spin_until(harness.executor, lambda: "camera_info: 160x120, plumb_bob" in log.read_text(), 10)
    _, out = feed(harness, image, t0 + 0.2, expect_matches=True)
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
    t0 = stream_start(harness)
    feed(harness, synthetic_frame(120, 160, seed=9), t0, expect_matches=False)
    feed(harness, synthetic_frame(120, 160, seed=9, shift=(1, 1)), t0 + 0.1, expect_matches=True)


def test_accounting_at_shutdown(tiny_eloftr_dir, tmp_path):
    """A node of its own (the module's keeps running for the other tests), fed a stream, a
    bad frame, a reset, in lockstep, then stopped: its shutdown line counts exactly that."""
    log = tmp_path / "node.log"
    with eloftr_node(tiny_eloftr_dir, log, "/el_acct") as (harness, process):
        image = synthetic_frame(120, 160, seed=0)
        first, _ = feed(harness, image, 100.0, expect_matches=False)
        harness.publish(Image(height=8, width=8, encoding="bgr8", step=20, data=bytes(160)))
        harness.published += 1
        counts = harness.wait_counters(harness.fqn, lambda c: c.get("rejected") == 1)
        assert counts["rejected"] == 1, counts
        _, out = feed(harness, image, 100.1, expect_matches=True)  # the bad frame broke nothing
        assert out.stamp0 == first.header.stamp
        feed(harness, image, 50.0, expect_matches=False)  # backwards: a stream reset
        stop_node(process)
    text = log.read_text()
    counts = parse_counters(text)
    assert counts["received"] == harness.published == 4
    assert counts == {"received": 4, "processed": 3, "dropped": 0, "rejected": 1}, counts
    assert "stream reset" in text and process.returncode == 0 and "Traceback" not in text, text


def test_calibration_of_another_size_is_refused_and_nan_logged_once(running):
    """CameraInfo of 320x240 with 160x120 frames: refused once with both sizes named (the
    matches verified with F); a NaN calibration repeated is reported once."""
    from sensor_msgs.msg import CameraInfo
    from kp_ros.ros.qos import output_qos
    harness, _, log = running
    image, t0 = synthetic_frame(120, 160, seed=0), stream_start(harness)
    assert harness.set_params(NODE, {"geometric_verification": "essential"})[0].successful
    info_pub = harness.node.create_publisher(CameraInfo, "/el_test/camera_info", output_qos())
    spin_until(harness.executor, lambda: info_pub.get_subscription_count() >= 1, 10)
    nan = CameraInfo(width=160, height=120, k=[float("nan")] * 9)
    for _ in range(3):
        info_pub.publish(nan)
    assert spin_until(harness.executor, lambda: "camera_info ignored" in log.read_text(), 10)
    info_pub.publish(CameraInfo(width=320, height=240, distortion_model="plumb_bob",
                                k=[200.0, 0, 160, 0, 200.0, 120, 0, 0, 1]))
    assert spin_until(harness.executor, lambda: "camera_info: 320x240" in log.read_text(), 10)
    feed(harness, image, t0, expect_matches=False)
    _, out = feed(harness, image, t0 + 0.1, expect_matches=True)
    assert len(out.inliers) == len(out.x0)  # verified, with F
    text = log.read_text()
    assert text.count("camera_info is for 320x240 images, the frames are 160x120") == 1, text[-3000:]
    assert text.count("camera_info ignored") == 1
    assert harness.set_params(NODE, {"geometric_verification": "none"})[0].successful
    harness.node.destroy_publisher(info_pub)


def test_bad_stamp_is_one_rejected_frame_and_diagnostics_show_lost_and_resets(running):
    from kp_ros.ros.conversions import array_to_image_msg
    harness, _, log = running
    before = harness.wait_counters(NODE, lambda c: c.get("received") == harness.published)
    msg = array_to_image_msg(synthetic_frame(120, 160, seed=1))
    msg.header.stamp.sec = -5
    harness.publish(msg)
    harness.published += 1
    after = harness.wait_counters(NODE, lambda c: c.get("rejected") == before["rejected"] + 1)
    assert after["rejected"] == before["rejected"] + 1 and after["received"] == harness.published
    assert spin_until(harness.executor, lambda: "bad stamp: negative seconds" in log.read_text(), 10)
    assert {"lost", "stream resets"} <= set(harness.diagnostics[NODE])
