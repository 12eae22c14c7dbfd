"""The bad-input corpus (test_robustness_conversions.py) fed to both nodes over DDS, raw
and compressed, each node in its own process as the launch file runs it.

Every input is either processed correctly (a valid output message: consistent array
lengths, coordinates inside the image, the image's header) or rejected and counted; in
both cases the next good frame is processed. Feeding is lockstep: after each frame the
test waits until the node's /diagnostics counters equal what it expects, so nothing is
dropped and ``received == processed + dropped + rejected`` is checked at every step,
and again on each node's shutdown line.

eloftr_node runs resize 'native' for the small corpus (fast; 'model' at odd sizes is
covered in test_coordinate_properties.py) and switches to 'model' at runtime for the
4000x3000 frames ('native' caps them at 1664x1248: seconds per frame on this CPU).

Each test stands alone, in any order: ``Fed`` mirrors what each node has been sent (its
counters, latest stamp, last good frame), tests that need a new stream make one with a
stamp jump, and a node stopped by the shutdown test is restarted for the next test.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage

from conftest import synthetic_frame
from kp_ros.msg import Keypoints, Matches
from kp_ros.ros.conversions import array_to_image_msg, keypoints_from_msg, matches_from_msg
from kp_ros.ros.qos import output_qos
from ros_helpers import (NodeHarness, parse_counters, ros_node, spin_until, start_node, stop_node,
                         to_time)
from test_robustness_conversions import COMPRESSED_CORPUS, RAW_CORPUS, Case

GOOD_SIZE = (120, 160)


@dataclass
class Fed:
    """One node under test, as the test sees it: its harness and what it must have counted."""
    executable: str
    namespace: str
    compressed: bool
    process: object = None
    log: object = None
    harness: NodeHarness | None = None
    expected: dict = field(default_factory=lambda: {"received": 0, "processed": 0, "dropped": 0,
                                                    "rejected": 0})
    stamp: float = 1000.0  # only moves forward: every stamp the node was sent is <= it
    last_good: object = None  # the matcher's last good frame, when the next one must match it
    params: dict = field(default_factory=dict)
    log_dir: object = None
    starts: int = 0

    @property
    def fqn(self) -> str:
        return f"{self.namespace}/{self.executable}"

    @property
    def matcher(self) -> bool:
        return self.executable == "eloftr_node"

    def next_stamp(self) -> Time:
        self.stamp += 0.1
        return to_time(self.stamp)

    def new_stream_stamp(self) -> float:
        """100 s after every stamp this node was sent, more than max_frame_gap (1.5 s): a
        frame there starts a new stream whatever the node saw before (or if it saw nothing)."""
        return self.stamp + 100

    def start(self) -> None:
        """(Re)start the node process; a fresh process has counted nothing and seen no frame."""
        self.starts += 1
        self.log = self.log_dir / f"{self.namespace.strip('/')}-{self.starts}.log"
        self.process = start_node(self.executable, params=self.params, namespace=self.namespace,
                                  log_path=self.log)
        self.expected = dict.fromkeys(self.expected, 0)
        self.last_good = None


@pytest.fixture(scope="module")
def started_fleet(tiny_superpoint_dir, tmp_path_factory):
    """All four nodes started at once (their start-up overlaps), one driver node."""
    from kp_ros.core.random_init import save_random_eloftr
    nodes = {"sp": Fed("superpoint_node", "/rb_sp", False), "el": Fed("eloftr_node", "/rb_el", False),
             "sp_c": Fed("superpoint_node", "/rb_spc", True), "el_c": Fed("eloftr_node", "/rb_elc", True)}
    root = tmp_path_factory.mktemp("robustness_nodes")
    eloftr_model = save_random_eloftr(root / "eloftr_seed1", "tiny", seed=1)  # many matches
    for fed in nodes.values():
        params = {"device": "cpu", "diagnostics_period": 0.1, "reliable_input": True,
                  "use_compressed": fed.compressed}
        if fed.matcher:
            params.update(model=str(eloftr_model), match_threshold=0.0, resize="native")
        else:
            params.update(model=str(tiny_superpoint_dir), max_keypoints=50)
        fed.params, fed.log_dir = params, root
        fed.start()
    try:
        with ros_node("robustness_driver") as (node, executor):
            for fed in nodes.values():
                output = (Matches, "matches") if fed.matcher else (Keypoints, "keypoints")
                image_topic = f"{fed.namespace}/{'unused' if fed.compressed else 'image'}"
                fed.harness = NodeHarness(node, executor, image_topic, output[0], f"{fed.namespace}/{output[1]}")
                if fed.compressed:
                    fed.harness.image_pub = node.create_publisher(
                        CompressedImage, f"{fed.namespace}/image/compressed", output_qos())
            for fed in nodes.values():
                assert fed.harness.wait_ready(120, fed.fqn), f"{fed.fqn} never subscribed:\n{fed.log.read_text()}"
            yield nodes
    finally:
        for fed in nodes.values():
            stop_node(fed.process)


@pytest.fixture
def fleet(started_fleet):
    """The four nodes, each running: one that test_accounting_and_clean_shutdown stopped is
    started again (with fresh expected counters), so no test depends on running before it."""
    stopped = [fed for fed in started_fleet.values() if fed.process.poll() is not None]
    if stopped:
        executor = stopped[0].harness.executor
        # Take in the old processes' last /diagnostics first: their counters must not pass
        # for a new node's (which start at zero: checked below).
        spin_until(executor, lambda: False, 0.5)
        for fed in stopped:
            fed.harness.diagnostics.pop(fed.fqn, None)
            fed.start()
        for fed in stopped:
            assert fed.harness.wait_ready(120, fed.fqn), f"{fed.fqn} never subscribed:\n{fed.log.read_text()}"
            counts = fed.harness.wait_counters(fed.fqn, lambda c, fed=fed: c == fed.expected)
            assert counts == fed.expected, (fed.fqn, counts)
    return started_fleet


# --- feeding ---------------------------------------------------------------------------------

def publish(fed: Fed, msg, outcome: str, frame_id: str = "camera", stamp: Time | None = None,
            wait_output: bool = True):
    """Publish ``msg`` with a fresh stamp, wait until the node counted it as ``outcome``
    ('processed' or 'rejected') and return (the message, its output or None). The matcher
    has no output for a frame that starts a stream: ``wait_output=False`` skips waiting."""
    msg.header.stamp = stamp or fed.next_stamp()
    msg.header.frame_id = frame_id
    seen = len(fed.harness.outputs)
    fed.harness.publish(msg)
    fed.expected["received"] += 1
    fed.expected[outcome] += 1
    counts = fed.harness.wait_counters(fed.fqn, lambda c: c == fed.expected, timeout=60)
    assert counts == fed.expected, (f"{fed.fqn}: expected {fed.expected}, counters say {counts}\n"
                                    f"{fed.log.read_text()[-3000:]}")
    assert counts["received"] == counts["processed"] + counts["dropped"] + counts["rejected"]

    def output():
        return next((m for m in fed.harness.outputs[seen:] if m.header.stamp == msg.header.stamp), None)
    if outcome == "processed" and wait_output:
        # Published before the counter moves; over DDS it may still be on its way.
        spin_until(fed.harness.executor, lambda: output() is not None, 10)
    return msg, output()


def good_frame(fed: Fed, seed: int = 0):
    """The node's reference frame: textured 120x160, a little shifted each time."""
    image = synthetic_frame(*GOOD_SIZE, seed=0, shift=(seed % 5, seed % 3))
    if not fed.compressed:
        return array_to_image_msg(image)
    import cv2
    return CompressedImage(format="png", data=cv2.imencode(".png", image[:, :, ::-1])[1].tobytes())


def check_keypoints(out: Keypoints, msg, size) -> None:
    assert out is not None, "no Keypoints for a processed frame"
    assert out.header == msg.header and (out.height, out.width) == size
    n = len(out.x)
    assert len(out.y) == len(out.scores) == n and out.descriptor_size > 0
    assert len(out.descriptors) == n * out.descriptor_size
    features = keypoints_from_msg(out)
    assert_inside(features["keypoints"], size)
    assert np.isfinite(features["scores"]).all() and np.isfinite(features["descriptors"]).all()


def check_matches(out: Matches, msg, previous, size) -> None:
    assert out is not None, "no Matches for the second of two consecutive frames"
    assert out.header == msg.header and (out.height, out.width) == size
    assert out.stamp0 == previous.header.stamp and out.frame_id0 == previous.header.frame_id
    n = len(out.x0)
    assert len(out.y0) == len(out.x1) == len(out.y1) == len(out.scores) == n
    assert len(out.inliers) in (0, n)
    matches = matches_from_msg(out)
    assert_inside(matches["keypoints0"], size)
    assert_inside(matches["keypoints1"], size)
    assert np.isfinite(matches["scores"]).all()


def assert_inside(points: np.ndarray, size) -> None:
    """Inside the image's extent [-0.5, W - 0.5] x [-0.5, H - 0.5] (pixel centres at integers:
    a 1x1 frame's keypoints lie within half a pixel of 0)."""
    height, width = size
    assert np.isfinite(points).all()
    assert (points >= -0.5).all() and (points[:, 0] <= width - 0.5).all() and (points[:, 1] <= height - 0.5).all()


def feed_case(fed: Fed, case: Case) -> None:
    if case.accepted:
        size = case.shape[:2]
        msg, out = publish(fed, case.build(), "processed", wait_output=not fed.matcher)
        if fed.matcher:  # a second frame of the same size continues the stream: Matches
            again, out = publish(fed, case.build(), "processed")
            check_matches(out, again, msg, size)
        else:
            check_keypoints(out, msg, size)
    else:
        publish(fed, case.build(), "rejected")
    # The node lives on: the next good frame is processed (and, for the matcher, matched
    # against the previous good frame when only rejected frames came in between).
    continues = fed.matcher and not case.accepted and fed.last_good is not None
    msg, out = publish(fed, good_frame(fed, int(fed.stamp * 10)), "processed",
                       wait_output=continues or not fed.matcher)
    if fed.matcher:
        if continues:
            check_matches(out, msg, fed.last_good, GOOD_SIZE)
        fed.last_good = msg
    else:
        check_keypoints(out, msg, GOOD_SIZE)


SMALL_RAW = [case for case in RAW_CORPUS if not case.big]


@pytest.mark.parametrize("case", SMALL_RAW, ids=lambda c: c.name)
@pytest.mark.parametrize("node", ["sp", "el"])
def test_raw_corpus(fleet, node, case):
    feed_case(fleet[node], case)


@pytest.mark.parametrize("case", COMPRESSED_CORPUS, ids=lambda c: c.name)
@pytest.mark.parametrize("node", ["sp_c", "el_c"])
def test_compressed_corpus(fleet, node, case):
    feed_case(fleet[node], case)


@pytest.mark.parametrize("node", ["sp", "el"])
def test_4000x3000_frame_with_model_resize(fleet, node):
    fed = fleet[node]
    (case,) = [case for case in RAW_CORPUS if case.big]
    if fed.matcher:
        assert fed.harness.set_params(fed.fqn, {"resize": "model"})[0].successful
    try:
        feed_case(fed, case)
    finally:
        if fed.matcher:
            assert fed.harness.set_params(fed.fqn, {"resize": "native"})[0].successful


def test_superpoint_keeps_each_header_when_stamps_go_back_repeat_and_frame_ids_change(fleet):
    fed = fleet["sp"]
    base = fed.new_stream_stamp()
    plan = [(base, "cam_a"), (base - 5, "cam_b"), (base - 5, "cam_b"), (base - 5, "cam_c"), (base + 1, "cam_a")]
    for i, (stamp, frame_id) in enumerate(plan):
        seen = len(fed.harness.outputs)
        msg, _ = publish(fed, good_frame(fed, i), "processed", frame_id,
                         to_time(stamp))
        spin_until(fed.harness.executor, lambda: len(fed.harness.outputs) > seen, 10)
        out = fed.harness.outputs[seen]  # stamps repeat: take this frame's output by order
        check_keypoints(out, msg, GOOD_SIZE)
        assert out.header.frame_id == frame_id
    fed.stamp = base + 2


def test_matcher_restarts_on_stamps_going_back_or_repeating_and_follows_frame_ids(fleet):
    fed = fleet["el"]
    base = fed.new_stream_stamp()

    def send(stamp, frame_id, matched):
        msg, out = publish(fed, good_frame(fed, int(stamp * 10)), "processed", frame_id,
                           to_time(stamp),
                           wait_output=matched)
        if not matched:  # give a wrong Matches the time to show up
            spin_until(fed.harness.executor, lambda: False, 0.3)
            out = next((m for m in fed.harness.outputs if m.header.stamp == msg.header.stamp), None)
        assert (out is not None) == matched, f"stamp {stamp}: expected {'a' if matched else 'no'} Matches"
        return msg, out

    a, _ = send(base, "cam_a", matched=False)  # a jump past anything sent before: a new stream
    b, out = send(base + 0.1, "cam_b", matched=True)  # a frame_id change is no reason to restart
    check_matches(out, b, a, GOOD_SIZE)
    send(base - 5, "cam_b", matched=False)  # backwards
    c, _ = send(base - 5, "cam_b", matched=False)  # repeated
    d, out = send(base - 4.9, "cam_c", matched=True)
    check_matches(out, d, c, GOOD_SIZE)
    fed.stamp = base + 1
    fed.last_good = None


def test_accounting_and_clean_shutdown(fleet):
    """Each node's shutdown line: received = published = processed + dropped + rejected,
    after whatever ran before plus two bad frames and two good ones of this test's own."""
    bad = {False: next(c for c in RAW_CORPUS if c.name == "data shorter than step*height"),
           True: next(c for c in COMPRESSED_CORPUS if c.name == "empty")}
    for fed in fleet.values():
        for _ in range(2):  # the second good frame continues the matcher's stream
            feed_case(fed, bad[fed.compressed])
    for fed in fleet.values():
        code, _ = stop_node(fed.process)
        text = fed.log.read_text()
        counts = parse_counters(text)
        assert counts == fed.expected, (fed.fqn, counts, fed.expected)
        assert counts["received"] == counts["processed"] + counts["dropped"] + counts["rejected"]
        assert code == 0 and "Traceback" not in text, text[-3000:]
        if counts["rejected"]:
            rejections = [line for line in text.splitlines() if "frame rejected:" in line]
            assert rejections and all("[ERROR]" in line for line in rejections), rejections
