"""The stereo step end to end on a synthetic rectified pair with a known disparity,
through FeaturePipeline as the node and process_bag run it: tiny random-init SuperPoint,
and EfficientLoFTR with hand-made features (test_eloftr_correctness.HandMadeFeatureMatcher:
random weights find only a few matches on this texture, all true for an exact shift by a
multiple of 8 px, which the last test checks with the real random-init model); and the
batched two-image SuperPoint forward against two single ones."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import synthetic_frame
from test_eloftr_correctness import HandMadeFeatureMatcher
from kp_ros.core.stereo import StereoParams, rig_from_infos

HEIGHT, WIDTH = 224, 320  # multiples of 32: model pixels == source pixels with resize native
DISPARITY = 16            # px, a multiple of EfficientLoFTR's 8 px coarse cell
FX, BASELINE = 300.0, 0.1


def p_info(tx: float):
    return SimpleNamespace(p=[FX, 0, WIDTH / 2, tx, 0, FX, HEIGHT / 2, 0, 0, 0, 1, 0])


def stereo_pair(dx: int = 0):
    """(left, right) of a fronto-parallel textured plane: the right image shows the left's
    content DISPARITY px to the left (x_right = x_left - DISPARITY); ``dx`` moves the camera."""
    left = synthetic_frame(HEIGHT, WIDTH, seed=3, shift=(dx, 0))
    right = synthetic_frame(HEIGHT, WIDTH, seed=3, shift=(dx + DISPARITY, 0))
    return left, right


@pytest.fixture(scope="module")
def pipeline(tiny_superpoint_dir, tiny_eloftr_dir):
    import torch

    from kp_ros.core.pipeline import FeaturePipeline
    from kp_ros.core.stereo_matching import StereoMatcher
    from kp_ros.core.superpoint import SuperPointDetector
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only spin on a shared CPU
    detector = SuperPointDetector(str(tiny_superpoint_dir), device="cpu", resize="native",
                                  max_keypoints=200)
    matcher = HandMadeFeatureMatcher(str(tiny_eloftr_dir), device="cpu", resize="native",
                                     match_threshold=0.05)
    yield FeaturePipeline(detector, matcher, stereo=StereoMatcher(matcher, StereoParams()))
    torch.set_num_threads(threads)


def test_known_disparity_and_depth_are_recovered(pipeline):
    rig = rig_from_infos(p_info(0.0), p_info(-FX * BASELINE))
    left, right = stereo_pair()
    pipeline.restart()
    pipeline.match(left, 1, "rgb8")  # the temporal step first: its left backbone is reused
    step = pipeline.match_stereo(left, right, rig)
    found = step.matches
    assert found.problem is None and step.warning is None
    assert len(found.scores) >= 20, f"only {len(found.scores)} of {found.candidates} kept"
    assert np.median(np.abs(found.disparity - DISPARITY)) < 0.5
    assert np.mean(np.abs(found.disparity - DISPARITY) < 1.0) > 0.8
    np.testing.assert_allclose(np.median(found.depth), FX * BASELINE / DISPARITY, rtol=0.03)
    assert np.all(np.abs(found.left[:, 1] - found.right[:, 1]) <= 1.5)


def test_shared_left_backbone_gives_the_same_matches(pipeline):
    rig = rig_from_infos(p_info(0.0), p_info(-FX * BASELINE))
    left, right = stereo_pair()
    pipeline.restart()
    pipeline.match(left, 1, "rgb8")
    shared = pipeline.match_stereo(left, right, rig).matches
    fresh = pipeline.match_stereo(left.copy(), right, rig).matches  # not the pushed image
    np.testing.assert_array_equal(shared.left, fresh.left)
    np.testing.assert_array_equal(shared.disparity, fresh.disparity)


def test_stream_with_keypoint_links_and_depth_per_keypoint(pipeline):
    rig = rig_from_infos(p_info(0.0), p_info(-FX * BASELINE))
    pipeline.restart()
    for frame, dx in enumerate((0, 8)):
        left, right = stereo_pair(dx)
        found_left, found_right = pipeline.detect_stereo(left, right)
        temporal = pipeline.match(left, frame + 1, "rgb8")
        step = pipeline.match_stereo(left, right, rig, found_left.keypoints, found_right.keypoints)
        assert step.keypoints_right.shape == (len(found_left.keypoints), 2)
        linked = np.isfinite(step.depth)
        assert linked.sum() >= 5
        disparity = found_left.keypoints[linked, 0] - step.keypoints_right[linked, 0]
        assert np.median(np.abs(disparity - DISPARITY)) < 1.0
        assert (temporal.matches is None) == (frame == 0)


def test_unrectified_pair_warns_once_and_gives_no_depth(pipeline):
    rig = rig_from_infos(p_info(0.0), p_info(0.0))  # no baseline in P
    left, right = stereo_pair()
    pipeline.restart()
    first = pipeline.match_stereo(left, right, rig)
    again = pipeline.match_stereo(left, right, rig)
    assert "Tx = 0" in first.warning and again.warning is None
    assert np.isnan(first.matches.depth).all() and len(first.matches.disparity) > 0
    # Rows that do not agree (the right image moved down 16 px): unrectified, no depth.
    good = rig_from_infos(p_info(0.0), p_info(-FX * BASELINE))
    shifted = synthetic_frame(HEIGHT, WIDTH, seed=3, shift=(DISPARITY, 16))
    step = pipeline.match_stereo(left, shifted, good)
    assert "rows do not agree" in step.warning and np.isnan(step.matches.depth).all()


def test_batched_detection_equals_two_single_ones(pipeline):
    from kp_ros.core.stereo_matching import detect_pair
    left, right = stereo_pair()
    batched = detect_pair(pipeline.detector, left, right)
    single = detect_pair(pipeline.detector, left, right, batched=False)
    for one, other in zip(batched, single):
        np.testing.assert_array_equal(one["keypoints"], other["keypoints"])
        np.testing.assert_allclose(one["scores"], other["scores"], atol=1e-5)
        np.testing.assert_allclose(one["descriptors"], other["descriptors"], atol=1e-4)


def test_random_init_model_matches_give_the_true_disparity(tiny_eloftr_dir):
    from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher
    from kp_ros.core.stereo_matching import StereoMatcher
    matcher = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", resize="native",
                                          match_threshold=0.0)
    rig = rig_from_infos(p_info(0.0), p_info(-FX * BASELINE))
    found = StereoMatcher(matcher).match(*stereo_pair(), rig)
    assert len(found.scores) >= 1
    np.testing.assert_allclose(found.disparity, DISPARITY, atol=1.0)
    np.testing.assert_allclose(found.depth, FX * BASELINE / found.disparity, rtol=1e-5)
