"""lightglue_node in its own process, fed hand-made Keypoints over DDS (lockstep): one
Matches per frame after the first, whose index0 / index1 point at the very keypoints
whose positions it carries; a permuted copy of a frame matches back to its permutation;
stream resets on stamp gaps and size changes; malformed Keypoints rejected and counted,
the node alive; /diagnostics and the shutdown line count exactly what was sent.
Each test stands alone, in any order: it starts its own stream (100 s after every stamp
sent before), counters are read as deltas, and the shutdown test runs a node of its own."""
import contextlib

import numpy as np
import pytest
from builtin_interfaces.msg import Time

from kp_ros.msg import Keypoints, Matches
from kp_ros.ros.conversions import keypoints_to_msg, matches_from_msg
from kp_ros.ros.qos import output_qos
from ros_helpers import NodeHarness, parse_counters, ros_node, spin_until, start_node, stop_node, to_time

NS = "/lg_test"
NODE = f"{NS}/lightglue_node"
DESCRIPTOR_SIZE = 256  # the tiny LightGlue's SuperPoint descriptor size
# random weights: matching scores are small, so keep every mutual nearest neighbour
PARAMS = {"device": "cpu", "filter_threshold": 0.0, "max_matches": 2048,
          "geometric_verification": "none", "diagnostics_period": 0.2}


@pytest.fixture(scope="module")
def tiny_lightglue_dir(tmp_path_factory):
    from kp_ros.core.random_init import save_random_lightglue
    return save_random_lightglue(tmp_path_factory.mktemp("lightglue_tiny"), "tiny", seed=0)


class KeypointsHarness(NodeHarness):
    """NodeHarness whose input is kp_ros/Keypoints (the node subscribes no image unless
    its overlay is wanted)."""

    def __init__(self, node, executor, namespace, executable="lightglue_node"):
        super().__init__(node, executor, f"{namespace}/unused_image", Matches, f"{namespace}/matches")
        node.destroy_publisher(self.image_pub)
        self.image_pub = node.create_publisher(Keypoints, f"{namespace}/keypoints", output_qos())
        self.fqn = f"{namespace}/{executable}"
        self.published, self.last_stamp = 0, 0.0


@contextlib.contextmanager
def lightglue_node(model_dir, log, namespace, executable="lightglue_node"):
    """A lightglue_node (or another sparse matcher's node) process in ``namespace`` and the
    test's harness, discovery done."""
    process = start_node(executable, namespace=namespace, log_path=log,
                         params={"model": str(model_dir), **PARAMS})
    try:
        with ros_node(f"{namespace.strip('/')}_driver") as (node, executor):
            harness = KeypointsHarness(node, executor, namespace, executable)
            assert harness.wait_ready(90, harness.fqn), f"node never subscribed:\n{log.read_text()}"
            yield harness, process
    finally:
        stop_node(process)


@pytest.fixture(scope="module")
def running(tiny_lightglue_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("lightglue_node") / "node.log"
    with lightglue_node(tiny_lightglue_dir, log, NS) as (harness, process):
        yield harness, process, log


def scene(n=60, seed=0, size=(120, 160)):
    """Hand-made keypoints in a ``size`` (H, W) frame: positions, scores, unit descriptors."""
    rng = np.random.default_rng(seed)
    xy = (rng.random((n, 2)) * [size[1] - 1, size[0] - 1]).astype(np.float32)
    descriptors = rng.standard_normal((n, DESCRIPTOR_SIZE)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return xy, rng.random(n).astype(np.float32), descriptors


def keypoints_msg(stamp: float, xy, scores, descriptors, size=(120, 160), frame_id="camera"):
    header = Keypoints().header
    header.stamp, header.frame_id = to_time(stamp), frame_id
    return keypoints_to_msg(header, size[0], size[1], "hand-made", xy, scores, descriptors)


def stream_start(harness) -> float:
    """A stamp 100 s after every stamp sent (more than max_frame_gap, 1.5 s): a new stream."""
    return float(int(harness.last_stamp) + 100)


def send(harness, msg, expect_matches: bool):
    """Publish one Keypoints, wait until the node has processed it; its Matches or None."""
    processed = harness.counters(harness.fqn).get("processed", 0)
    seen = len(harness.outputs)
    harness.publish(msg)
    harness.published += 1
    harness.last_stamp = max(harness.last_stamp, msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)

    def new_output():
        return next((m for m in harness.outputs[seen:] if m.header.stamp == msg.header.stamp), None)
    if expect_matches:
        spin_until(harness.executor, lambda: new_output() is not None, 30)
        assert new_output() is not None, f"no Matches for stamp {msg.header.stamp}"
        return new_output()
    counts = harness.wait_counters(harness.fqn, lambda c: c.get("processed", 0) > processed)
    assert counts["processed"] > processed, f"frame not processed: {counts}"
    spin_until(harness.executor, lambda: new_output() is not None, 0.3)
    assert new_output() is None, "a frame that starts a stream must not be matched"
    return None


def settled(counts: dict, published: int) -> bool:
    """Every frame sent has arrived and has been accounted for."""
    return counts.get("received") == published == sum(
        counts.get(k, 0) for k in ("processed", "dropped", "rejected"))


def test_matches_carry_indices_consistent_with_positions(running):
    """A frame, then the same keypoints shuffled and moved by (0.25, 0.5) px: the matches pair
    each keypoint with its own copy (LightGlue is permutation-equivariant), and index0 /
    index1 point at the positions the message carries."""
    harness, _, _ = running
    xy, scores, descriptors = scene()
    order = np.random.default_rng(1).permutation(len(xy))
    moved = xy[order] + np.float32([0.25, 0.5])
    t0 = stream_start(harness)
    first = keypoints_msg(t0, xy, scores, descriptors, frame_id="cam_0")
    second = keypoints_msg(t0 + 0.1, moved, scores[order], descriptors[order], frame_id="cam_1")
    assert send(harness, first, expect_matches=False) is None
    out = send(harness, second, expect_matches=True)
    assert out.header == second.header
    assert out.stamp0 == first.header.stamp and out.frame_id0 == "cam_0"
    assert (out.height, out.width) == (120, 160) and len(out.inliers) == 0
    m = matches_from_msg(out)
    n = len(m["scores"])
    assert n > len(xy) // 2 and len(m["index0"]) == len(m["index1"]) == n
    np.testing.assert_array_equal(m["keypoints0"], xy[m["index0"]])
    np.testing.assert_array_equal(m["keypoints1"], moved[m["index1"]])
    assert len(set(m["index0"].tolist())) == n and len(set(m["index1"].tolist())) == n  # one-to-one
    correct = order[m["index1"]] == m["index0"]
    assert correct.mean() > 0.9, f"{correct.sum()} of {n} matches are the keypoint's own copy"
    assert np.all(np.diff(m["scores"]) <= 0)


def test_stamp_gap_resets_the_stream(running):
    harness, _, log = running
    xy, scores, descriptors = scene(seed=2)
    t0 = stream_start(harness)
    resets = int(harness.diagnostics.get(NODE, {}).get("stream resets", 0))
    send(harness, keypoints_msg(t0, xy, scores, descriptors), expect_matches=False)
    send(harness, keypoints_msg(t0 + 0.1, xy, scores, descriptors), expect_matches=True)
    gap = keypoints_msg(t0 + 10.1, xy, scores, descriptors)  # > max_frame_gap (1.5 s)
    send(harness, gap, expect_matches=False)
    out = send(harness, keypoints_msg(t0 + 10.2, xy, scores, descriptors), expect_matches=True)
    assert out.stamp0 == gap.header.stamp  # matched against the frame that reset
    assert spin_until(harness.executor, lambda: int(
        harness.diagnostics[NODE].get("stream resets", 0)) > resets, 10)
    assert "stream reset" in log.read_text()


def test_size_change_resets_the_stream(running):
    harness, _, _ = running
    xy, scores, descriptors = scene(seed=3)
    t0 = stream_start(harness)
    send(harness, keypoints_msg(t0, xy, scores, descriptors), expect_matches=False)
    send(harness, keypoints_msg(t0 + 0.1, xy, scores, descriptors), expect_matches=True)
    small = keypoints_msg(t0 + 0.2, xy / 2, scores, descriptors, size=(60, 80))
    send(harness, small, expect_matches=False)
    out = send(harness, keypoints_msg(t0 + 0.3, xy / 2, scores, descriptors, size=(60, 80)),
               expect_matches=True)
    assert (out.height, out.width) == (60, 80) and out.stamp0 == small.header.stamp


def test_malformed_keypoints_are_rejected_counted_and_the_node_lives_on(running):
    harness, _, log = running
    before = harness.wait_counters(NODE, lambda c: settled(c, harness.published))
    xy, scores, descriptors = scene(n=5, seed=4)
    t0 = stream_start(harness)
    uneven = keypoints_msg(t0, xy, scores, descriptors)
    uneven.y = uneven.y[:3]  # 5 x, 3 y
    short = keypoints_msg(t0 + 0.1, xy, scores, descriptors[:, :64])  # descriptor_size 64
    truncated = keypoints_msg(t0 + 0.2, xy, scores, descriptors)
    truncated.descriptors = truncated.descriptors[:100]
    no_size = keypoints_msg(t0 + 0.3, xy, scores, descriptors, size=(0, 0))
    bad_stamp = keypoints_msg(t0 + 0.4, xy, scores, descriptors)
    bad_stamp.header.stamp = Time(sec=-3)
    bad = [uneven, short, truncated, no_size, bad_stamp]
    for i, msg in enumerate(bad):
        harness.publish(msg)
        harness.published += 1
        harness.wait_counters(NODE, lambda c: c.get("rejected") == before["rejected"] + i + 1)
    after = harness.wait_counters(NODE, lambda c: settled(c, harness.published))
    assert after["rejected"] == before["rejected"] + len(bad), after
    assert after["received"] == before["received"] + len(bad)
    assert after["processed"] == before["processed"]  # none reached the matcher
    assert "frame rejected: Keypoints with 5 x, 3 y" in log.read_text()  # later ones rate-limited
    harness.last_stamp = max(harness.last_stamp, t0 + 1)
    t1 = stream_start(harness)
    xy, scores, descriptors = scene(seed=5)
    send(harness, keypoints_msg(t1, xy, scores, descriptors), expect_matches=False)
    send(harness, keypoints_msg(t1 + 0.1, xy, scores, descriptors), expect_matches=True)


def test_each_malformed_keypoints_has_its_reason():
    """The input's checks on arrival (kp_ros/ros/keypoints_input.py), one reason each."""
    from kp_ros.core.stamps import stamp_problem
    from kp_ros.ros.keypoints_input import keypoints_problem
    xy, scores, descriptors = scene(n=5, seed=4)
    good = keypoints_msg(1.0, xy, scores, descriptors)
    assert keypoints_problem(good, DESCRIPTOR_SIZE) is None
    uneven = keypoints_msg(1.0, xy, scores, descriptors)
    uneven.y = uneven.y[:3]
    truncated = keypoints_msg(1.0, xy, scores, descriptors)
    truncated.descriptors = truncated.descriptors[:100]
    for msg, reason in ((uneven, "5 x, 3 y, 5 scores"),
                        (keypoints_msg(1.0, xy, scores, descriptors[:, :64]), "descriptor_size 64"),
                        (truncated, "100 descriptor values for 5 x 256"),
                        (keypoints_msg(1.0, xy, scores, descriptors, size=(0, 0)), "empty image size")):
        assert reason in keypoints_problem(msg, DESCRIPTOR_SIZE)
    empty = keypoints_msg(1.0, np.zeros((0, 2)), np.zeros(0), None)  # no descriptors at all: a frame
    assert keypoints_problem(empty, DESCRIPTOR_SIZE) is None
    assert "negative" in stamp_problem(Time(sec=-3))


def test_an_empty_frame_is_a_frame(running):
    """No keypoints (a blank wall): processed, and matched as zero matches, not rejected."""
    harness, _, _ = running
    xy, scores, descriptors = scene(seed=6)
    t0 = stream_start(harness)
    send(harness, keypoints_msg(t0, xy, scores, descriptors), expect_matches=False)
    empty = keypoints_msg(t0 + 0.1, np.zeros((0, 2)), np.zeros(0), np.zeros((0, DESCRIPTOR_SIZE)))
    out = send(harness, empty, expect_matches=True)
    assert len(out.x0) == len(out.index0) == 0


def test_diagnostics_and_shutdown_count_exactly_what_was_sent(tiny_lightglue_dir, tmp_path):
    """A node of its own, fed a stream, a malformed message and a gap, in lockstep, then
    stopped: /diagnostics and its shutdown line count exactly that."""
    log = tmp_path / "node.log"
    with lightglue_node(tiny_lightglue_dir, log, "/lg_acct") as (harness, process):
        xy, scores, descriptors = scene(seed=7)
        send(harness, keypoints_msg(100.0, xy, scores, descriptors), expect_matches=False)
        bad = keypoints_msg(100.05, xy, scores, descriptors)
        bad.scores = bad.scores[:1]
        harness.publish(bad)
        harness.published += 1
        assert harness.wait_counters(harness.fqn, lambda c: c.get("rejected") == 1)["rejected"] == 1
        send(harness, keypoints_msg(100.1, xy, scores, descriptors), expect_matches=True)
        send(harness, keypoints_msg(110.0, xy, scores, descriptors), expect_matches=False)  # gap
        counts = harness.wait_counters(harness.fqn, lambda c: c.get("processed") == 3)
        assert counts == {"received": 4, "processed": 3, "dropped": 0, "rejected": 1}, counts
        assert spin_until(harness.executor, lambda: harness.diagnostics[harness.fqn].get(
            "stream resets") == "1", 10), harness.diagnostics[harness.fqn]
        values = harness.diagnostics[harness.fqn]
        assert values["input topic"] == "/lg_acct/keypoints" and values["device"] == "cpu"
        stop_node(process)
    text = log.read_text()
    assert parse_counters(text) == {"received": 4, "processed": 3, "dropped": 0, "rejected": 1}
    assert process.returncode == 0 and "Traceback" not in text, text
