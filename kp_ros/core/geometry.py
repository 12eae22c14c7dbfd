"""Geometric verification of point correspondences with OpenCV's robust estimators.

``verify_matches`` flags the matches consistent with one two-view model: a fundamental
matrix (any rigid scene, moving camera), a homography (planar scene, or pure camera
rotation) or, with the camera's calibration (``CameraModel``, from a CameraInfo), an
essential matrix: the points are undistorted (plumb_bob / rational_polynomial or
equidistant) and OpenCV's 5-point solver runs in RANSAC, with the threshold still given
in pixels. Without a calibration 'essential' falls back to 'fundamental' (callers say so
once). It never raises on degenerate input: too few points, NaNs, collinear or duplicated
points just give no inliers.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from kp_ros.core.params import VERIFICATION_CHOICES

VERIFICATION_METHODS = VERIFICATION_CHOICES
MIN_POINTS = {"fundamental": 8, "homography": 4, "essential": 5}
DISTORTION_MODELS = ("plumb_bob", "rational_polynomial", "equidistant")
# USAC_MAGSAC (OpenCV >= 4.5) is more accurate and needs less threshold tuning than RANSAC.
_ROBUST_METHOD = getattr(cv2, "USAC_MAGSAC", cv2.RANSAC)
_CONFIDENCE = 0.999
_MAX_ITERS = 2000


@dataclass(frozen=True)
class CameraModel:
    """A pinhole camera with lens distortion, as sensor_msgs/CameraInfo describes it."""
    K: np.ndarray                  # (3, 3) intrinsics of the raw (distorted) image
    D: np.ndarray                  # distortion coefficients (may be empty)
    distortion_model: str = "plumb_bob"
    width: int = 0
    height: int = 0

    @property
    def focal(self) -> float:
        return float(self.K[0, 0] + self.K[1, 1]) / 2.0


def camera_from_info(k, d, distortion_model: str, width: int = 0, height: int = 0) -> CameraModel:
    """CameraModel from CameraInfo fields (k: 9 row-major values, d, distortion_model);
    ValueError with the reason when unusable (no focal length, unknown model)."""
    K = np.asarray(k, np.float64).reshape(3, 3) if len(k) == 9 else None
    if K is None or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"camera_info has no usable intrinsics (k = {list(k)})")
    model = distortion_model or "plumb_bob"
    D = np.asarray(d, np.float64).reshape(-1)
    if model not in DISTORTION_MODELS:
        raise ValueError(f"camera_info distortion_model {distortion_model!r} is not supported: "
                         f"use one of {', '.join(DISTORTION_MODELS)}")
    if model == "equidistant" and len(D) not in (0, 4):
        raise ValueError(f"equidistant distortion needs 4 coefficients, got {len(D)}")
    if not np.isfinite(D).all():
        raise ValueError("camera_info distortion coefficients are not finite")
    return CameraModel(K, D, model, int(width), int(height))


def camera_of_info(info, rectified: bool = False) -> CameraModel:
    """CameraModel of a CameraInfo (rclpy or rosbags message). ``rectified``: the camera of
    its rectified image (image_rect, a stereo pair): the projection P's left 3x3 without
    distortion, when P is set; else K and D of the raw image. ValueError when unusable."""
    k, d, model = info.k, info.d, info.distortion_model
    p = np.asarray(info.p, np.float64).reshape(-1)
    if rectified and p.size == 12 and p[0] > 0:
        k, d, model = p.reshape(3, 4)[:, :3].reshape(-1), (), "plumb_bob"
    return camera_from_info(k, d, model, info.width, info.height)


def camera_info_key(k, d, distortion_model: str, width: int, height: int) -> tuple:
    """A CameraInfo's calibration as a hashable key that compares NaN equal to NaN (bytes),
    so a driver repeating one broken calibration with every frame is judged once."""
    return (np.asarray(k, np.float64).tobytes(), np.asarray(d, np.float64).tobytes(),
            distortion_model, int(width), int(height))


class CameraInfoCache:
    """The CameraModel of the newest CameraInfo of one camera, judged once per calibration
    (drivers repeat it with every frame, a broken one too). ``rectified``: see camera_of_info."""

    def __init__(self, rectified: bool = False):
        self.rectified = rectified
        self.camera: CameraModel | None = None
        self.problem: str | None = None  # why the newest calibration is unusable
        self._key = None

    def update(self, info) -> bool:
        """Take ``info``; True when its calibration is new (then ``camera`` and ``problem``
        say what it gave: a CameraModel, or None and the reason)."""
        key = (camera_info_key(info.k, info.d, info.distortion_model, info.width, info.height),
               np.asarray(info.p, np.float64).tobytes() if self.rectified else b"")
        if key == self._key:
            return False
        self._key = key
        try:
            self.camera, self.problem = camera_of_info(info, self.rectified), None
        except ValueError as exc:
            self.camera, self.problem = None, str(exc)
        return True


class CalibrationGate:
    """The calibration essential verification may use for each frame: ``camera`` (set from
    a CameraInfo) only when it was calibrated at the frame's size. Another size (K of
    1280x720 with 640x480 frames) is refused, not scaled: binning, cropping and the driver's
    own resize change K differently, and a wrong K silently corrupts the inlier flags. A
    CameraInfo with width = height = 0 states no size and is used as it is."""

    def __init__(self):
        self.camera: CameraModel | None = None
        self._refused: tuple | None = None  # the last (calibration size, image size) refused

    def for_image(self, width: int, height: int) -> tuple[CameraModel | None, str | None]:
        """(calibration or None, a warning when this refusal is new, else None)."""
        camera = self.camera
        if camera is None or (camera.width, camera.height) in ((0, 0), (width, height)):
            self._refused = None
            return camera, None
        key = ((camera.width, camera.height), (width, height))
        if key == self._refused:
            return None, None
        self._refused = key
        return None, (f"camera_info is for {camera.width}x{camera.height} images, the frames "
                      f"are {width}x{height}: calibration refused, verifying with a "
                      f"fundamental matrix until a camera_info of the frames' size arrives")


def undistort_points(points, camera: CameraModel) -> np.ndarray:
    """(N, 2) raw pixels -> (N, 2) normalised image coordinates (x/z, y/z), undistorted."""
    p = _as_points(points).astype(np.float64).reshape(-1, 1, 2)
    if not len(p):
        return np.zeros((0, 2))
    if camera.distortion_model == "equidistant":
        D = camera.D if len(camera.D) else np.zeros(4)
        return cv2.fisheye.undistortPoints(p, camera.K, D.reshape(4, 1)).reshape(-1, 2)
    return cv2.undistortPoints(p, camera.K, camera.D if len(camera.D) else None).reshape(-1, 2)


def verify_matches(points0, points1, method: str = "fundamental",
                   reproj_threshold: float = 1.0, camera: CameraModel | None = None) -> np.ndarray:
    """uint8 inlier flags (N,) for the correspondences ``points0[k] <-> points1[k]`` ((N, 2) x, y).

    ``method``: 'none' (all zeros: nothing verified), 'fundamental' (>= 8 points needed),
    'homography' (>= 4) or 'essential' (>= 5, needs ``camera``; 'fundamental' without).
    ``reproj_threshold`` is in pixels (the epipolar distance for F and E; for E it is
    divided by the focal length, as the solver works in normalised coordinates).
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
    if method == "essential" and camera is None:
        method = "fundamental"
    finite = np.isfinite(p0).all(1) & np.isfinite(p1).all(1)
    if finite.sum() < MIN_POINTS[method]:
        return flags
    try:
        if method == "essential":
            n0, n1 = undistort_points(p0[finite], camera), undistort_points(p1[finite], camera)
            # RANSAC: the USAC variants of findEssentialMat want pixel input and K.
            _, mask = cv2.findEssentialMat(n0, n1, np.eye(3), cv2.RANSAC, _CONFIDENCE,
                                           reproj_threshold / camera.focal)
        elif method == "fundamental":
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
    """(N, 2) float32, contiguous, from any array-like (numpy in: the core's boundary)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return np.ascontiguousarray(points, dtype=np.float32)
