"""kp_ros/core/pipeline.py: continuity, pairing, resets and overlays, with stand-in models."""
import numpy as np
import pytest

from kp_ros.core.pipeline import FeaturePipeline


class CountingMatcher:
    """Pairs each pushed frame with the previous one like EfficientLoFTRStreamMatcher:
    one match whose x is the older frame's fill value."""

    def __init__(self):
        self.previous, self.fail_next = None, False

    def reset(self):
        self.previous = None

    def push(self, image):
        if self.fail_next:
            self.fail_next = False
            raise ValueError("boom")
        previous, self.previous = self.previous, float(image[0, 0, 0])
        if previous is None:
            return None
        return {"keypoints0": np.array([[previous, 0.0]], np.float32),
                "keypoints1": np.array([[1.0, 1.0]], np.float32),
                "scores": np.array([0.5], np.float32), "inliers": np.zeros(0, np.uint8)}


class FixedDetector:
    def detect(self, image):
        return {"keypoints": np.array([[2.0, 3.0]], np.float32), "scores": np.array([0.9], np.float32),
                "descriptors": np.ones((1, 4), np.float32)}


def frame(value, size=(8, 8)):
    return np.full(size + (3,), value, np.uint8)


def test_pairs_each_frame_with_the_previous_and_passes_numpy_through():
    pipeline = FeaturePipeline(matcher=CountingMatcher())
    first = pipeline.match(frame(1), 1_000_000_000, "rgb8", token="a")
    assert first.matches is None and first.reset is None
    second = pipeline.match(frame(2), 1_100_000_000, "rgb8", token="b", overlay=True)
    assert second.previous == "a" and second.reset is None
    assert isinstance(second.matches["keypoints0"], np.ndarray)
    assert second.matches["keypoints0"][0, 0] == 1.0  # paired with frame 1
    assert second.overlay.ndim == 3 and second.overlay.dtype == np.uint8


@pytest.mark.parametrize("image, stamp_ns, encoding, reason", [
    (frame(2, (8, 16)), 1_100_000_000, "rgb8", "image size changed"),
    (frame(2), 1_100_000_000, "bgr8", "encoding changed"),
    (frame(2), 900_000_000, "rgb8", "stamp went backwards"),
    (frame(2), 9_000_000_000, "rgb8", "stamp jumped"),
])
def test_a_broken_stream_resets_with_its_reason_and_gives_no_matches(image, stamp_ns, encoding, reason):
    pipeline = FeaturePipeline(matcher=CountingMatcher(), max_frame_gap=1.5)
    pipeline.match(frame(1), 1_000_000_000, "rgb8", token="a")
    step = pipeline.match(image, stamp_ns, encoding, token="b")
    assert step.matches is None and reason in step.reset and pipeline.resets == 1
    after = pipeline.match(frame(3, image.shape[:2]), stamp_ns + 100_000_000, encoding, token="c")
    assert after.previous == "b" and after.reset is None


def test_a_gap_judged_on_arrival_resets_the_next_processed_frame():
    """A node: every frame arrives, only some are processed (keep-latest drops the rest)."""
    pipeline = FeaturePipeline(matcher=CountingMatcher(), max_frame_gap=1.5)
    pipeline.match(frame(1), 1_000_000_000, "rgb8", token="a", arrival=pipeline.arrive(1_000_000_000))
    pipeline.arrive(5_000_000_000)              # dropped, but its gap counts
    arrival = pipeline.arrive(5_100_000_000)
    step = pipeline.match(frame(2), 5_100_000_000, "rgb8", token="b", arrival=arrival)
    assert step.matches is None and "stamp jumped" in step.reset


def test_a_matcher_failure_restarts_the_stream():
    matcher = CountingMatcher()
    pipeline = FeaturePipeline(matcher=matcher)
    pipeline.match(frame(1), 1_000_000_000, "rgb8", token="a")
    matcher.fail_next = True
    with pytest.raises(ValueError, match="boom"):
        pipeline.match(frame(2), 1_100_000_000, "rgb8", token="b")
    step = pipeline.match(frame(3), 1_200_000_000, "rgb8", token="c")
    assert step.matches is None and step.reset is None  # never pairs c with a
    assert pipeline.match(frame(4), 1_300_000_000, "rgb8", token="d").previous == "c"


def test_detect_returns_numpy_and_an_overlay_when_asked():
    pipeline = FeaturePipeline(detector=FixedDetector())
    found = pipeline.detect(frame(5), overlay=True)
    assert isinstance(found.keypoints, np.ndarray) and found.keypoints.tolist() == [[2.0, 3.0]]
    assert found.overlay.shape == (8, 8, 3)
    assert pipeline.detect(frame(5)).overlay is None
