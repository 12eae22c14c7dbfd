"""Rectified stereo: the rig from the two CameraInfos, the checks on left-right matches,
disparity and depth. ROS-free, numpy in and out.

For a rectified pair (image_pipeline's ``image_rect``) a point is on the same row in
both images and its disparity ``d = x_left - x_right`` gives its depth along the left
optical axis: ``Z = fx * baseline / (d - (cx_left - cx_right))``, with fx and baseline from
the right camera's projection matrix P (``P[3] = Tx = -fx * baseline``, as camera_info
documents; cx_left - cx_right is 0 unless the rectification kept different principal
points). A match is kept when ``|y_left - y_right| <= max_row_error`` and ``d`` lies in
``[min_disparity, max_disparity]``.

Unrectified input gives no depth, never an exception: a right P without a baseline
(Tx = 0, or no P at all) and matches whose rows do not agree (the median row error of a
pair above ``max_row_error``) each set ``problem``, which the caller reports once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from kp_ros.core.params import STEREO

_SPEC = {p.name: p for p in STEREO}
# Below this many matches the row agreement of a pair is not judged (too few to tell).
MIN_MATCHES_TO_JUDGE_ROWS = 8


@dataclass(frozen=True)
class StereoParams:
    """The rectified-stereo checks; defaults (and what each means) in kp_ros/core/params.py."""
    max_row_error: float = _SPEC["stereo_max_row_error"].default  # px
    min_disparity: float = _SPEC["min_disparity"].default        # px
    max_disparity: float = _SPEC["max_disparity"].default        # px

    def validated(self) -> "StereoParams":
        values = {}
        for name in ("max_row_error", "min_disparity", "max_disparity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of pixels, got {value!r}")
            values[name] = float(value)
        if values["max_row_error"] < 0:
            raise ValueError(f"stereo_max_row_error must be >= 0 px, got {self.max_row_error!r}")
        if values["min_disparity"] > values["max_disparity"]:
            raise ValueError(f"min_disparity ({self.min_disparity}) must not exceed "
                             f"max_disparity ({self.max_disparity})")
        return replace(self, **values)

    @classmethod
    def from_values(cls, values: dict) -> "StereoParams":
        """Validated checks from a node's parameter values (or process_bag's flags)."""
        return cls(**{field: values[name] for name, field in STEREO_PARAM_NAMES.items()}).validated()


# Node parameter -> StereoParams field.
STEREO_PARAM_NAMES = {"stereo_max_row_error": "max_row_error", "min_disparity": "min_disparity",
                      "max_disparity": "max_disparity"}


@dataclass(frozen=True)
class StereoRig:
    """What depth needs of a rectified pair; ``problem`` says why there is no depth."""
    fx: float = math.nan        # px, of the rectified right camera
    baseline: float = math.nan  # metres (of the units of P's Tx), > 0 for a right camera
    cx_offset: float = 0.0      # cx_left - cx_right, px
    problem: str | None = None

    @property
    def has_depth(self) -> bool:
        return self.problem is None

    def depth(self, disparity) -> np.ndarray:
        """Depth (float32) for disparities; NaN where none (no rig, disparity <= offset)."""
        disparity = np.asarray(disparity, np.float32) - np.float32(self.cx_offset)
        if not self.has_depth:
            return np.full(disparity.shape, np.nan, np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = np.float32(self.fx * self.baseline) / disparity
        return np.where(disparity > 0, depth, np.float32(np.nan)).astype(np.float32)


def _projection(info) -> np.ndarray | None:
    p = np.asarray(getattr(info, "p", ()) if info is not None else (), np.float64).reshape(-1)
    return p.reshape(3, 4) if p.size == 12 and np.isfinite(p).all() and p[0] > 0 else None


def rig_from_infos(left_info, right_info) -> StereoRig:
    """The rig from the left and right sensor_msgs/CameraInfo (rclpy or rosbags; anything
    with ``p``), or one with ``problem`` set: never raises for bad calibration."""
    left, right = _projection(left_info), _projection(right_info)
    if right is None:
        return StereoRig(problem="the right CameraInfo has no projection matrix P (all zeros "
                                 "or missing): cannot tell the baseline, so no depth")
    fx, tx = float(right[0, 0]), float(right[0, 3])
    if tx == 0.0:
        return StereoRig(fx=fx, problem=(
            "the right CameraInfo's P has Tx = 0 (no baseline): the pair looks unrectified; "
            "no depth. Feed image_rect and the rectified camera_info"))
    baseline = -tx / fx
    if baseline < 0:
        return StereoRig(fx=fx, problem=f"the right CameraInfo's P gives a negative baseline "
                                        f"({baseline:.4g}): left and right look swapped; no depth")
    cx_offset = float(left[0, 2] - right[0, 2]) if left is not None else 0.0
    if left is not None and abs(left[0, 0] - fx) > 1e-3 * fx:
        return StereoRig(fx=fx, baseline=baseline, problem=(
            f"left and right P disagree on fx ({left[0, 0]:.6g} vs {fx:.6g}): not one rectified "
            f"pair; no depth"))
    return StereoRig(fx=fx, baseline=baseline, cx_offset=cx_offset)


@dataclass
class StereoMatchSet:
    """Left-right correspondences that passed the checks, best first."""
    left: np.ndarray       # (M, 2) float32 x, y in the left image
    right: np.ndarray      # (M, 2) float32 in the right image
    scores: np.ndarray     # (M,) float32
    disparity: np.ndarray  # (M,) float32 px, x_left - x_right
    depth: np.ndarray      # (M,) float32, NaN where none
    candidates: int = 0    # matches before the checks
    problem: str | None = None  # why there is no depth (rig or rows), None when there is


def empty_match_set(problem: str | None = None) -> StereoMatchSet:
    zeros = np.zeros((0, 2), np.float32)
    flat = np.zeros(0, np.float32)
    return StereoMatchSet(zeros, zeros.copy(), flat, flat.copy(), flat.copy(), 0, problem)


def passes_checks(left: np.ndarray, right: np.ndarray, params: StereoParams) -> np.ndarray:
    """(M,) bool: on one row (within max_row_error) and disparity within the range."""
    disparity = left[:, 0] - right[:, 0]
    return (np.abs(left[:, 1] - right[:, 1]) <= params.max_row_error) \
        & (disparity >= params.min_disparity) & (disparity <= params.max_disparity)


def rows_problem(left: np.ndarray, right: np.ndarray, params: StereoParams) -> str | None:
    """Why the pair looks unrectified (median row error above the limit), or None."""
    if len(left) < MIN_MATCHES_TO_JUDGE_ROWS:
        return None
    median = float(np.median(np.abs(left[:, 1] - right[:, 1])))
    if median <= params.max_row_error:
        return None
    return (f"left and right rows do not agree (median row error {median:.1f} px > "
            f"stereo_max_row_error {params.max_row_error:g} px): the pair looks unrectified; "
            f"feed image_rect topics. No depth")


def check_matches(left, right, scores, rig: StereoRig, params: StereoParams) -> StereoMatchSet:
    """The matches of a rectified pair that lie on one row and within the disparity range,
    with disparity and depth. When their rows do not agree at all (``rows_problem``) the
    pair is taken as unrectified: ``problem`` says so and depths are NaN."""
    left = np.asarray(left, np.float32).reshape(-1, 2)
    right = np.asarray(right, np.float32).reshape(-1, 2)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if not len(left) == len(right) == len(scores):
        raise ValueError(f"stereo matches need as many left ({len(left)}), right ({len(right)}) "
                         f"points and scores ({len(scores)})")
    problem = rows_problem(left, right, params) or rig.problem
    keep = passes_checks(left, right, params)
    disparity = left[keep, 0] - right[keep, 0]
    depth = (StereoRig(problem=problem) if problem else rig).depth(disparity)
    return StereoMatchSet(left[keep], right[keep], scores[keep], disparity, depth,
                          len(scores), problem)


def link_keypoints(keypoints_left, keypoints_right, matches: StereoMatchSet, radius: float,
                   rig: StereoRig, params: StereoParams) -> tuple[np.ndarray, np.ndarray]:
    """For each left keypoint, its right keypoint (the left one moved by the nearest stereo
    match's displacement, then the nearest right keypoint within ``radius``: track
    association 'flow') and its depth: ((N, 2) right x, y, (N,) depth); NaN where the
    keypoint has no right match or the pair fails the checks (depth also NaN when
    ``matches.problem``)."""
    from kp_ros.core.tracks import as_points, associate

    keypoints_left, keypoints_right = as_points(keypoints_left), as_points(keypoints_right)
    right_xy = np.full((len(keypoints_left), 2), np.nan, np.float32)
    depth = np.full(len(keypoints_left), np.nan, np.float32)
    if not len(matches.scores) or not len(keypoints_right) or not len(keypoints_left):
        return right_xy, depth
    idx_left, idx_right = associate(keypoints_left, keypoints_right, matches.left, matches.right,
                                    matches.scores, radius, mode="flow")
    pair_left, pair_right = keypoints_left[idx_left], keypoints_right[idx_right]
    ok = passes_checks(pair_left, pair_right, params)
    idx_left, pair_left, pair_right = idx_left[ok], pair_left[ok], pair_right[ok]
    right_xy[idx_left] = pair_right
    rig = StereoRig(problem=matches.problem) if matches.problem else rig
    depth[idx_left] = rig.depth(pair_left[:, 0] - pair_right[:, 0])
    return right_xy, depth
