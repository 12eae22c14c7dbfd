"""kp_ros/core/stereo.py: the rig from CameraInfo P, the rectified-stereo checks, disparity,
depth and the left-keypoint -> right-keypoint links, on hand-made points."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from kp_ros.core.stereo import (StereoParams, StereoRig, check_matches, link_keypoints,
                                rig_from_infos)

FX, BASELINE = 400.0, 0.12


def info(tx: float = 0.0, fx: float = FX, cx: float = 160.0, p=None):
    """A rectified CameraInfo's P (K' | Tx), as image_pipeline / camera_calibration write it."""
    if p is None:
        p = [fx, 0.0, cx, tx, 0.0, fx, 120.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    return SimpleNamespace(p=p)


def rig() -> StereoRig:
    return rig_from_infos(info(), info(tx=-FX * BASELINE))


def test_rig_reads_fx_and_the_baseline_from_the_right_p():
    found = rig()
    assert found.problem is None and found.fx == FX
    assert found.baseline == pytest.approx(BASELINE)
    assert found.depth([16.0])[0] == pytest.approx(FX * BASELINE / 16.0)


@pytest.mark.parametrize("right, words", [
    (info(tx=0.0), "Tx = 0"), (info(p=[0.0] * 12), "no projection"),
    (SimpleNamespace(p=[]), "no projection"), (None, "no projection"),
    (info(tx=+FX * BASELINE), "swapped"), (info(tx=-FX * BASELINE, fx=2 * FX), "disagree on fx"),
])
def test_unusable_calibration_gives_a_reason_and_no_depth(right, words):
    found = rig_from_infos(info(), right)
    assert words in found.problem
    assert math.isnan(found.depth([10.0])[0])


def test_principal_point_offset_is_taken_off_the_disparity():
    found = rig_from_infos(info(cx=170.0), info(tx=-FX * BASELINE, cx=160.0))
    assert found.cx_offset == 10.0
    assert found.depth([26.0])[0] == pytest.approx(FX * BASELINE / 16.0)


def test_checks_keep_matches_on_one_row_within_the_disparity_range():
    params = StereoParams(max_row_error=1.5, min_disparity=1.0, max_disparity=64.0)
    left = np.array([[100, 50], [100, 60], [100, 70], [100, 80], [100, 90], [10, 10]], np.float32)
    right = left - np.array([[16, 0], [16, 1.4], [16, 1.6], [0.5, 0], [80, 0], [-3, 0]], np.float32)
    found = check_matches(left, right, np.linspace(1, 0.5, 6), rig(), params)
    assert found.candidates == 6 and found.problem is None
    np.testing.assert_array_equal(found.left, left[:2])  # row error 1.6, d 0.5, 80, -3 dropped
    np.testing.assert_allclose(found.disparity, [16.0, 16.0])
    np.testing.assert_allclose(found.depth, FX * BASELINE / 16.0, rtol=1e-6)


def test_rows_that_do_not_agree_mean_unrectified_no_depth():
    rng = np.random.default_rng(0)
    left = rng.uniform(0, 300, (40, 2)).astype(np.float32)
    right = left - [16, 0] + rng.uniform(-30, 30, (40, 2)).astype(np.float32) * [0, 1]
    found = check_matches(left, right, np.ones(40), rig(), StereoParams())
    assert "rows do not agree" in found.problem
    assert np.isnan(found.depth).all()


def test_no_baseline_keeps_disparity_but_no_depth():
    found = check_matches([[50, 20]], [[34, 20]], [1.0], rig_from_infos(info(), info()),
                          StereoParams())
    assert found.disparity.tolist() == [16.0] and np.isnan(found.depth).all()
    assert "Tx = 0" in found.problem


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="must not exceed"):
        StereoParams(min_disparity=10, max_disparity=5).validated()
    with pytest.raises(ValueError, match="max_row_error"):
        StereoParams(max_row_error=float("nan")).validated()


def test_left_keypoints_get_their_right_keypoint_and_depth():
    """Hand-made: right keypoints = left ones shifted by 24 px; matches on a coarse grid
    near them (as EfficientLoFTR's are) carry the shift to each keypoint."""
    rng = np.random.default_rng(1)
    keypoints_left = rng.uniform(40, 280, (60, 2)).astype(np.float32)
    keypoints_right = keypoints_left - [24.0, 0.0]
    keypoints_right = np.concatenate([keypoints_right, [[5.0, 5.0]]]).astype(np.float32)
    grid = np.round(keypoints_left / 8) * 8
    matches = check_matches(grid, grid - [24, 0], np.ones(len(grid)), rig(), StereoParams())
    right_xy, depth = link_keypoints(keypoints_left, keypoints_right, matches, 8.0, rig(),
                                     StereoParams())
    linked = np.isfinite(depth)
    assert linked.mean() > 0.9
    np.testing.assert_allclose(right_xy[linked], keypoints_right[:-1][linked], atol=1e-5)
    np.testing.assert_allclose(depth[linked], FX * BASELINE / 24.0, rtol=1e-5)
    assert np.isnan(right_xy[~linked]).all()
    # A keypoint with nothing near it in the right image stays NaN, never a wrong link.
    lone = np.array([[300.0, 230.0]], np.float32)
    right_xy, depth = link_keypoints(lone, keypoints_right, matches, 3.0, rig(), StereoParams())
    assert np.isnan(right_xy).all() and np.isnan(depth).all()
