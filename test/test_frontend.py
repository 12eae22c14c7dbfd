"""kp_ros/core/frontend.py: one frame's detection, temporal matches, stereo step and tracks
in one call, as frontend_node and process_bag run it. EfficientLoFTR with hand-made
features (test_eloftr_correctness.HandMadeFeatureMatcher: random weights match too little
to link many tracks), tiny random-init SuperPoint and LightGlue (filter_threshold 0: index
links whatever the weights)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import synthetic_frame
from test_eloftr_correctness import HandMadeFeatureMatcher
from test_stereo_pipeline import BASELINE, DISPARITY, FX, HEIGHT, WIDTH, p_info, stereo_pair
from kp_ros.core.frontend import FrontEnd, track_trails
from kp_ros.core.pipeline import FeaturePipeline
from kp_ros.core.stereo import StereoParams, rig_from_infos
from kp_ros.core.tracks import TrackBook, TrackParams

SECOND = 1_000_000_000
STEP = SECOND // 10


@pytest.fixture(scope="module")
def detector(tiny_superpoint_dir):
    import torch

    from kp_ros.core.superpoint import SuperPointDetector
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only spin on a shared CPU
    yield SuperPointDetector(str(tiny_superpoint_dir), device="cpu", resize="native",
                             max_keypoints=200)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oracle(tiny_eloftr_dir):
    return HandMadeFeatureMatcher(str(tiny_eloftr_dir), device="cpu", resize="native",
                                  match_threshold=0.05)


@pytest.fixture(scope="module")
def tiny_lightglue_dir(tmp_path_factory):
    from kp_ros.core.random_init import save_random_lightglue
    return save_random_lightglue(tmp_path_factory.mktemp("lightglue_tiny"), "tiny", seed=0)


def mono_frontend(detector, matcher, **track):
    book = TrackBook(TrackParams(**{"inliers_only": False, **track}))
    return FrontEnd(FeaturePipeline(detector, matcher), book)


def test_mono_eloftr_tracks_link_and_follow_the_motion(detector, oracle):
    frontend = mono_frontend(detector, oracle)
    results = []
    for i in range(3):  # the camera content moves 8 px right per frame
        image = synthetic_frame(HEIGHT, WIDTH, seed=5, shift=(-8 * i, 0))
        results.append(frontend.step(image, SECOND + i * STEP, "rgb8", token=f"frame{i}"))
    first, second, third = results
    assert first.match.matches is None and first.linked == 0 and first.matches is None
    assert first.tracks.why_new == "no matches for this frame"
    for k, (older, newer) in enumerate(((first, second), (second, third))):
        assert newer.previous_stamp_ns == older.stamp_ns and newer.match.previous == f"frame{k}"
        assert newer.matches.stamp0_ns == older.stamp_ns and newer.matches.index0 is None
        assert newer.linked >= 20, f"only {newer.linked} of {len(newer.tracks.ids)} linked"
        linked = np.flatnonzero(newer.tracks.previous_index >= 0)
        moved = newer.tracks.keypoints[linked] - older.tracks.keypoints[newer.tracks.previous_index[linked]]
        assert np.median(np.abs(moved - [8, 0]).max(axis=1)) < 1.0
        np.testing.assert_array_equal(newer.tracks.ids[linked],
                                      older.tracks.ids[newer.tracks.previous_index[linked]])
        assert newer.stereo is None and newer.keypoints_right is None
    # Tracks of all three frames: trails reach back two frames.
    trails = track_trails([r.tracks for r in results], third.tracks, 3)
    assert np.isfinite(trails[:, 2]).all(axis=1).sum() >= 10


def test_stamp_gap_restarts_tracks_with_the_reason(detector, oracle):
    frontend = mono_frontend(detector, oracle)
    image = synthetic_frame(HEIGHT, WIDTH, seed=5)
    frontend.step(image, SECOND, "rgb8")
    after_gap = frontend.step(image, 10 * SECOND, "rgb8")  # > max_frame_gap 1.5 s
    assert after_gap.linked == 0 and after_gap.match.reset and after_gap.tracks.why_new == after_gap.match.reset


def test_a_failing_matcher_restarts_the_stream_and_adds_no_tracks(detector, oracle, monkeypatch):
    frontend = mono_frontend(detector, oracle)
    images = [synthetic_frame(HEIGHT, WIDTH, seed=5, shift=(-8 * i, 0)) for i in range(3)]
    frontend.step(images[0], SECOND, "rgb8")

    def fail(image):
        raise RuntimeError("device gone")
    monkeypatch.setattr(oracle, "push", fail)
    with pytest.raises(RuntimeError):
        frontend.step(images[1], SECOND + STEP, "rgb8")
    monkeypatch.undo()
    after = frontend.step(images[2], SECOND + 2 * STEP, "rgb8")
    assert after.match.matches is None and after.linked == 0
    assert after.tracks.ids.min() > 0  # new ids, never reused


def test_lightglue_links_by_keypoint_index(detector, tiny_lightglue_dir):
    from kp_ros.core.lightglue import LightGlueStreamMatcher
    matcher = LightGlueStreamMatcher(str(tiny_lightglue_dir), device="cpu", filter_threshold=0.0)
    frontend = mono_frontend(detector, matcher)
    assert frontend.sparse
    results = [frontend.step(synthetic_frame(HEIGHT, WIDTH, seed=5, shift=(-8 * i, 0)),
                             SECOND + i * STEP) for i in range(2)]
    newer = results[1]
    found = newer.match.matches
    assert len(found["index0"]) > 0 and newer.matches.index0 is not None
    # Every match is a link (one-to-one, no score floor, unverified): previous_index says so.
    np.testing.assert_array_equal(newer.tracks.previous_index[found["index1"]], found["index0"])
    assert newer.linked == len(found["index0"])


def test_stereo_tracks_carry_the_right_position_and_depth(detector, oracle):
    from kp_ros.core.stereo_matching import StereoMatcher
    pipeline = FeaturePipeline(detector, oracle, stereo=StereoMatcher(oracle, StereoParams()))
    frontend = FrontEnd(pipeline, TrackBook(TrackParams(inliers_only=False)))
    rig = rig_from_infos(p_info(0.0), p_info(-FX * BASELINE))
    results = []
    for i, dx in enumerate((0, 8)):
        left, right = stereo_pair(dx)
        results.append(frontend.step(left, SECOND + i * STEP, "rgb8", right=right, rig=rig))
    for result in results:
        assert result.detection_right is not None and result.stereo.warning is None
        found = result.stereo.matches
        assert np.median(np.abs(found.disparity - DISPARITY)) < 0.5
        np.testing.assert_allclose(np.median(found.depth), FX * BASELINE / DISPARITY, rtol=0.03)
        right_xy, depth = result.keypoints_right, result.depth
        assert right_xy.shape == (len(result.tracks.ids), 2) and depth.shape == (len(result.tracks.ids),)
        known = np.isfinite(depth)
        assert known.sum() >= 5
        disparity = result.tracks.keypoints[known, 0] - right_xy[known, 0]
        assert np.median(np.abs(disparity - DISPARITY)) < 1.0
        np.testing.assert_allclose(np.median(depth[known]), FX * BASELINE / DISPARITY, rtol=0.05)
        assert np.isnan(right_xy[~known]).all()
    assert results[1].linked >= 10


def test_mono_and_stereo_calls_are_not_mixed(detector, oracle):
    frontend = mono_frontend(detector, oracle)
    image = synthetic_frame(HEIGHT, WIDTH, seed=5)
    with pytest.raises(ValueError, match="no stereo step"):
        frontend.step(image, SECOND, right=image)
    with pytest.raises(ValueError, match="both the detector and the matcher"):
        FrontEnd(FeaturePipeline(detector, None))
