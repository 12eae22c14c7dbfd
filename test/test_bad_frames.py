"""A malformed frame never costs a good one (issue 13, item 3): what is cheap to check is
checked in the subscription callback, so a frame that will be rejected neither takes the
keep-latest slot from the good frame waiting there nor counts in the stream's continuity.

The nodes run in-process with their real worker thread, whose core is held on the first
frame, so "a good frame waits in the slot while a bad one arrives" happens every time.
"""
from __future__ import annotations

import threading

import pytest
import rclpy

from conftest import synthetic_frame
from kp_ros.msg import Keypoints, Matches
from kp_ros.nodes.eloftr_node import EfficientLoFTRNode
from kp_ros.nodes.superpoint_node import SuperPointNode
from kp_ros.ros.conversions import array_to_image_msg
from ros_helpers import InProcessNode, to_time


def truncated(image, stamp_sec: float, frame_id: str = "camera"):
    """An Image whose data is shorter than step*height."""
    msg = array_to_image_msg(image)
    msg.data = bytes(msg.data)[: len(msg.data) // 2]
    msg.header.stamp = to_time(stamp_sec)
    msg.header.frame_id = frame_id
    return msg


def hold_first_call(obj, name: str) -> tuple[threading.Event, threading.Event]:
    """Make ``obj.name`` wait the first time it is called: (started, release) events."""
    real, started, release = getattr(obj, name), threading.Event(), threading.Event()

    def held(*args, **kwargs):
        if not started.is_set():
            started.set()
            assert release.wait(30)
        return real(*args, **kwargs)
    setattr(obj, name, held)
    return started, release


@pytest.fixture
def superpoint(tiny_superpoint_dir):
    harness = InProcessNode(SuperPointNode, "/bad_sp", Keypoints, "keypoints", {
        "model": str(tiny_superpoint_dir), "device": "cpu", "resize": "native"})
    yield harness
    if rclpy.ok(context=harness.context):
        harness.close()


@pytest.fixture
def eloftr(tiny_eloftr_dir):
    harness = InProcessNode(EfficientLoFTRNode, "/bad_el", Matches, "matches", {
        "model": str(tiny_eloftr_dir), "device": "cpu", "resize": "native",
        "match_threshold": 0.0, "max_frame_gap": 1.5})
    yield harness
    if rclpy.ok(context=harness.context):
        harness.close()


def test_bad_frame_after_each_good_one_costs_no_good_frame(superpoint):
    node = superpoint.node
    started, release = hold_first_call(node.core, "detect")
    good = [superpoint.submit(synthetic_frame(240, 320, seed=1), 1.0, wait=False)]
    assert started.wait(30)  # the worker holds frame 1; the slot is empty
    good.append(superpoint.submit(synthetic_frame(240, 320, seed=2), 2.0, wait=False))
    node.input.on_image(truncated(synthetic_frame(240, 320, seed=3), 2.5))  # right behind it
    release.set()
    assert node.worker.wait_idle(60)
    good.append(superpoint.submit(synthetic_frame(240, 320, seed=4), 3.0))
    node.input.on_image(truncated(synthetic_frame(240, 320, seed=5), 3.5))
    counts = node.worker.snapshot()
    assert (counts.received, counts.processed, counts.dropped, counts.rejected) == (5, 3, 0, 2), counts
    assert counts.received == counts.processed + counts.dropped + counts.rejected
    assert sum(counts.reasons.values()) == 2 and all(r.startswith("data has") for r in counts.reasons)
    for msg in good:
        assert superpoint.output_for(msg) is not None, msg.header.stamp


def test_a_bad_frame_never_breaks_the_stream(eloftr):
    """Its stamp jumps 100 s: had it counted in continuity, the next good frame would reset."""
    node = eloftr.node
    first = eloftr.submit(synthetic_frame(120, 160, seed=0, shift=(0, 0)), 10.0)
    node.input.on_image(truncated(synthetic_frame(120, 160, seed=0), 110.0))
    node.input.on_image(truncated(synthetic_frame(120, 160, seed=0), 5.0))  # and one going backwards
    second = eloftr.submit(synthetic_frame(120, 160, seed=0, shift=(2, 1)), 10.1)
    out = eloftr.output_for(second)
    assert out is not None, "the good frame after the bad ones was not matched"
    assert out.stamp0 == first.header.stamp
    assert node.resets == 0
    counts = node.worker.snapshot()
    assert (counts.received, counts.processed, counts.rejected) == (4, 2, 2), counts


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 8], ids=["empty", "garbage"])
def test_compressed_frames_checked_on_arrival_or_on_decoding(superpoint, data):
    """Empty CompressedImage data is refused in the callback; bytes that only fail to
    decode are rejected by the worker: either way counted once, never crashing."""
    from sensor_msgs.msg import CompressedImage
    node = superpoint.node
    node.input.on_image(CompressedImage(format="png", data=data))
    assert node.worker.wait_idle(30)
    counts = node.worker.snapshot()
    assert (counts.received, counts.processed, counts.rejected) == (1, 0, 1), counts
