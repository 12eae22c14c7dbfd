"""Geometric verification of point correspondences with OpenCV's robust estimators.

``verify_matches`` flags the matches consistent with one two-view model: a fundamental
matrix (any rigid scene, moving camera) or a homography (planar scene, or pure camera
rotation). It never raises on degenerate input: too few points, NaNs, collinear or
duplicated points just give no inliers.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

VERIFICATION_METHODS = ("none", "fundamental", "homography")
MIN_POINTS = {"fundamental": 8, "homography": 4}
# USAC_MAGSAC (OpenCV >= 4.5) is more accurate and needs less threshold tuning than RANSAC.
_ROBUST_METHOD = getattr(cv2, "USAC_MAGSAC", cv2.RANSAC)
_CONFIDENCE = 0.999
_MAX_ITERS = 2000


def verify_matches(points0, points1, method: str = "fundamental",
                   reproj_threshold: float = 1.0) -> np.ndarray:
    """uint8 inlier flags (N,) for the correspondences ``points0[k] <-> points1[k]`` ((N, 2) x, y).

    ``method``: 'none' (all zeros: nothing verified), 'fundamental' (>= 8 points needed)
    or 'homography' (>= 4). ``reproj_threshold`` is in pixels (the epipolar distance for F).
    """
    if method not in VERIFICATION_METHODS:
        raise ValueError(f"unknown verification method {method!r}: use one of {VERIFICATION_METHODS}")
    if not reproj_threshold > 0:
        raise ValueError(f"reproj_threshold must be > 0 pixels, got {reproj_threshold}")
    p0, p1 = _as_points(points0), _as_points(points1)
    if p0.shape != p1.shape:
        raise ValueError(f"points0 {p0.shape} and points1 {p1.shape} must have the same shape")
    flags = np.zeros(len(p0), np.uint8)
    if method == "none":
        return flags
    finite = np.isfinite(p0).all(1) & np.isfinite(p1).all(1)
    if finite.sum() < MIN_POINTS[method]:
        return flags
    try:
        if method == "fundamental":
            _, mask = cv2.findFundamentalMat(p0[finite], p1[finite], _ROBUST_METHOD,
                                             reproj_threshold, _CONFIDENCE, _MAX_ITERS)
        else:
            _, mask = cv2.findHomography(p0[finite], p1[finite], _ROBUST_METHOD,
                                         reproj_threshold, maxIters=_MAX_ITERS,
                                         confidence=_CONFIDENCE)
    except cv2.error:
        return flags  # degenerate configuration OpenCV refuses outright
    if mask is None:
        return flags  # no model found
    flags[finite] = mask.reshape(-1).astype(bool)
    return flags


def _as_points(points) -> np.ndarray:
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return np.ascontiguousarray(points, dtype=np.float32)
