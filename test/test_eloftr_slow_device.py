"""eloftr_node on a device slower than the camera: stamp gaps are judged between
consecutive *received* frames, so a node that takes longer than max_frame_gap per frame
still matches the frames it gets to (and counts the rest as dropped), while a real
break in the stream, even on a frame that is then dropped, still resets it.

The node runs in-process with its real worker thread; its core's ``push`` is slowed to
0.4 s, and frames arrive every 0.1 s (stamps 0.1 s apart) with max_frame_gap 0.25 s.
"""
from __future__ import annotations

import time

import pytest
import rclpy

from conftest import synthetic_frame
from kp_ros.msg import Matches
from kp_ros.nodes.eloftr_node import EfficientLoFTRNode
from ros_helpers import InProcessNode

PUSH_SECONDS = 0.4
FRAME_PERIOD = 0.1


@pytest.fixture
def slow_eloftr(tiny_eloftr_dir):
    harness = InProcessNode(EfficientLoFTRNode, "/slow_el", Matches, "matches", {
        "model": str(tiny_eloftr_dir), "device": "cpu", "resize": "native",
        "match_threshold": 0.0, "max_frame_gap": 0.25})
    real_push = harness.node.core.push

    def slow_push(image):
        time.sleep(PUSH_SECONDS)
        return real_push(image)
    harness.node.core.push = slow_push
    yield harness
    if rclpy.ok(context=harness.context):
        harness.close()


def stream(harness, first_stamp: float, count: int, seed: int = 0) -> list:
    """``count`` frames in real time, one every FRAME_PERIOD, stamps FRAME_PERIOD apart."""
    sent = []
    for i in range(count):
        image = synthetic_frame(120, 160, seed=seed, shift=(i % 4, i % 3))
        sent.append(harness.submit(image, first_stamp + i * FRAME_PERIOD, wait=False))
        time.sleep(FRAME_PERIOD)
    assert harness.node.worker.wait_idle(30)
    return sent


def stamp_key(stamp) -> tuple[int, int]:
    return stamp.sec, stamp.nanosec


def test_slow_device_still_matches_and_drops_instead_of_resetting(slow_eloftr):
    node = slow_eloftr.node
    sent = stream(slow_eloftr, 50.0, 12)
    counts = node.worker.snapshot()
    assert counts.received == 12 and counts.rejected == 0
    assert counts.dropped >= 4, counts  # 0.4 s per frame, a frame every 0.1 s
    assert counts.processed + counts.dropped == 12
    assert node.resets == 0, "gaps between processed frames exceed max_frame_gap, not between received"
    outputs = [slow_eloftr.output_for(msg, timeout=0.5) for msg in sent]
    published = [m for m in outputs if m is not None]
    assert len(published) == counts.processed - 1  # every processed frame but the first
    index = {stamp_key(m.header.stamp): i for i, m in enumerate(sent)}
    # The premise: while frames keep coming, consecutive processed frames are >= 0.4 s
    # (> max_frame_gap) apart. The last frame sent is processed whenever the worker frees
    # up after the stream ended, so its pair can be closer.
    pairs = [(index[stamp_key(m.stamp0)], index[stamp_key(m.header.stamp)]) for m in published]
    running = [(older, newer) for older, newer in pairs if newer != len(sent) - 1]
    assert running, pairs
    for older, newer in running:
        assert newer - older >= 3, f"consecutive processed frames are > max_frame_gap apart: {pairs}"


def test_a_gap_on_a_dropped_frame_still_resets(slow_eloftr):
    """Frame b jumps 2 s ahead but is overwritten before the worker gets to it; frame c,
    0.1 s after b, is the first processed after the break: no Matches, one reset."""
    node = slow_eloftr.node
    image = synthetic_frame(120, 160, seed=3)
    slow_eloftr.submit(image, 70.0)
    slow_eloftr.submit(image, 70.1, wait=False)  # worker busy with this one for 0.4 s
    time.sleep(0.05)
    slow_eloftr.submit(image, 72.1, wait=False)  # the break, waits in the slot ...
    c = slow_eloftr.submit(image, 72.2, wait=False)  # ... and is overwritten: dropped
    assert node.worker.wait_idle(30)
    counts = node.worker.snapshot()
    assert (counts.received, counts.processed, counts.dropped) == (4, 3, 1), counts
    assert node.resets == 1
    assert slow_eloftr.output_for(c, timeout=0.5) is None
    d = slow_eloftr.submit(image, 72.3)
    out = slow_eloftr.output_for(d)
    assert out is not None and stamp_key(out.stamp0) == stamp_key(c.header.stamp)
