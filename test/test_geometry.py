"""verify_matches: inliers of a known homography / fundamental matrix, outliers rejected,
degenerate input handled without raising."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import synthetic_frame
from kp_ros.core.geometry import camera_from_info, undistort_points, verify_matches

HOMOGRAPHY = np.array([[0.98, -0.05, 12.0], [0.04, 1.01, -7.0], [2e-5, -1e-5, 1.0]])


@pytest.fixture(params=["tum", "synthetic"])
def frame(request) -> np.ndarray:
    if request.param == "tum":
        return request.getfixturevalue("tum_frames")[0]
    return synthetic_frame(480, 640, seed=5)


def corners(image: np.ndarray, count: int = 300) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    points = cv2.goodFeaturesToTrack(gray, count, 0.01, 8)
    return points.reshape(-1, 2).astype(np.float64)


def with_outliers(points0, points1, fraction, rng, height, width):
    """Replace ``fraction`` of points1 by random positions > 20 px from the true ones."""
    points1 = points1.copy()
    count = int(len(points0) * fraction)
    bad = rng.choice(len(points0), count, replace=False)
    for index in bad:
        while True:
            candidate = rng.uniform([0, 0], [width, height])
            if np.linalg.norm(candidate - points1[index]) > 20:
                points1[index] = candidate
                break
    truth = np.ones(len(points0), bool)
    truth[bad] = False
    return points1, truth


def test_homography_separates_inliers_from_outliers(frame):
    """Corners of a real frame and their positions in the frame warped by a known
    homography (detected again in the warped image, so the noise is real)."""
    rng = np.random.default_rng(0)
    height, width = frame.shape[:2]
    warped = cv2.warpPerspective(frame, HOMOGRAPHY, (width, height))
    points0 = corners(frame)
    points1 = cv2.perspectiveTransform(points0[None], HOMOGRAPHY)[0]
    visible = (points1 > 10).all(1) & (points1[:, 0] < width - 10) & (points1[:, 1] < height - 10)
    points0, points1 = points0[visible], points1[visible]
    # Re-measure the projected corners on the warped image: real noise, not exact positions.
    gray1 = cv2.cvtColor(warped, cv2.COLOR_RGB2GRAY)
    measured = cv2.cornerSubPix(gray1, points1.astype(np.float32).reshape(-1, 1, 2), (3, 3), (-1, -1),
                                (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.01))
    measured = measured.reshape(-1, 2).astype(np.float64)
    stable = np.linalg.norm(measured - points1, axis=1) < 1.0
    points0, points1 = points0[stable], measured[stable]
    assert len(points0) > 50
    points1, truth = with_outliers(points0, points1, 0.3, rng, height, width)

    flags = verify_matches(points0, points1, "homography", reproj_threshold=2.0)
    assert flags.dtype == np.uint8 and flags.shape == (len(points0),)
    assert flags[truth].mean() > 0.9, f"only {flags[truth].mean():.0%} of true matches kept"
    assert flags[~truth].mean() < 0.05, f"{flags[~truth].mean():.0%} of outliers kept"


def test_fundamental_separates_inliers_from_outliers():
    """Two views of a random 3D scene (non-planar), with 0.3 px noise and 30% outliers."""
    rng = np.random.default_rng(1)
    K = np.array([[525.0, 0, 319.5], [0, 525.0, 239.5], [0, 0, 1]])
    scene = rng.uniform([-2, -1.5, 3], [2, 1.5, 8], size=(200, 3))
    rotation, _ = cv2.Rodrigues(np.array([0.02, -0.08, 0.01]))
    translation = np.array([0.3, 0.05, 0.1])

    def project(points):
        image = (K @ points.T).T
        return image[:, :2] / image[:, 2:]

    points0 = project(scene) + rng.normal(0, 0.3, (200, 2))
    points1 = project(scene @ rotation.T + translation) + rng.normal(0, 0.3, (200, 2))
    points1, truth = with_outliers(points0, points1, 0.3, rng, 480, 640)

    flags = verify_matches(points0, points1, "fundamental", reproj_threshold=1.0)
    assert flags[truth].mean() > 0.9
    assert flags[~truth].mean() < 0.1  # an outlier can fall near its epipolar line by chance


def test_none_flags_nothing():
    points = np.random.default_rng(2).uniform(0, 100, (20, 2))
    assert not verify_matches(points, points + 1, "none", 1.0).any()


@pytest.mark.parametrize("method, count", [("fundamental", 7), ("homography", 3), ("homography", 0)])
def test_too_few_points_gives_no_inliers(method, count):
    points = np.random.default_rng(3).uniform(0, 100, (count, 2))
    flags = verify_matches(points, points + 2, method, 1.0)
    assert flags.shape == (count,) and not flags.any()


@pytest.mark.parametrize("method", ["fundamental", "homography"])
def test_degenerate_input_never_raises(method):
    rng = np.random.default_rng(4)
    same = np.tile([[10.0, 20.0]], (30, 1))  # all points identical
    line = np.stack([np.linspace(0, 100, 30), np.linspace(0, 50, 30)], 1)  # collinear
    nan = rng.uniform(0, 100, (30, 2))
    nan[::3] = np.nan
    for points0, points1 in [(same, same), (line, line + 3), (nan, nan + 1)]:
        flags = verify_matches(points0, points1, method, 1.0)
        assert flags.shape == (30,) and flags.dtype == np.uint8
    assert not verify_matches(nan, nan + 1, method, 1.0)[::3].any(), "a NaN point cannot be an inlier"


def test_bad_arguments_are_rejected():
    points = np.zeros((10, 2))
    with pytest.raises(ValueError, match="method"):
        verify_matches(points, points, "affine", 1.0)
    with pytest.raises(ValueError, match="reproj_threshold"):
        verify_matches(points, points, "homography", 0.0)
    with pytest.raises(ValueError, match="shape"):
        verify_matches(points, points[:5], "homography", 1.0)


# --- essential matrix with a calibrated, distorted camera ----------------------------

K = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])
LENSES = {  # distortion_model: coefficients (strong enough that ignoring them costs pixels)
    "plumb_bob": np.array([-0.28, 0.08, 0.001, -0.001, 0.0]),
    "equidistant": np.array([-0.05, 0.01, -0.002, 0.0005]),
}


def two_views(model: str, outliers: int = 60, seed: int = 0):
    """A random 3-D scene seen by a calibrated camera from two poses; some matches moved
    off their true position by 10-40 px (outliers). Returns p0, p1, truth flags, camera."""
    rng = np.random.default_rng(seed)
    n = 300
    scene = np.c_[rng.uniform(-2, 2, n), rng.uniform(-1.5, 1.5, n), rng.uniform(4, 10, n)]
    rotation = cv2.Rodrigues(np.array([0.02, -0.05, 0.01]))[0]
    translation = np.array([0.3, 0.05, 0.1])
    D = LENSES[model]

    def project(r, t):
        rvec = cv2.Rodrigues(r)[0]
        if model == "equidistant":
            return cv2.fisheye.projectPoints(scene.reshape(-1, 1, 3), rvec, t, K, D.reshape(4, 1))[0].reshape(-1, 2)
        return cv2.projectPoints(scene, rvec, t, K, D)[0].reshape(-1, 2)

    p0, p1 = project(np.eye(3), np.zeros(3)), project(rotation, translation)
    truth = np.ones(n, bool)
    moved = rng.choice(n, outliers, replace=False)
    offset = rng.uniform(10, 40, (outliers, 2)) * rng.choice([-1, 1], (outliers, 2))
    p1[moved] += offset
    truth[moved] = False
    return p0, p1, truth, camera_from_info(K.ravel(), D, model, 640, 480)


@pytest.mark.parametrize("model", list(LENSES))
def test_essential_finds_the_inliers_of_a_distorted_camera(model):
    p0, p1, truth, camera = two_views(model)
    flags = verify_matches(p0, p1, "essential", 1.0, camera).astype(bool)
    assert flags[truth].mean() >= 0.99
    assert flags[~truth].mean() <= 0.05


def test_undistort_points_inverts_the_projection():
    for model, D in LENSES.items():
        camera = camera_from_info(K.ravel(), D, model)
        normalised = np.random.default_rng(1).uniform(-0.5, 0.5, (50, 2))
        rays = np.c_[normalised, np.ones(50)]
        zero = np.zeros(3)
        if model == "equidistant":
            pixels = cv2.fisheye.projectPoints(rays.reshape(-1, 1, 3), zero, zero, K, D.reshape(4, 1))[0]
        else:
            pixels = cv2.projectPoints(rays, zero, zero, K, D)[0]
        assert np.abs(undistort_points(pixels.reshape(-1, 2), camera) - normalised).max() < 1e-4


def test_essential_without_camera_is_fundamental():
    p0, p1, _, _ = two_views("plumb_bob")
    assert np.array_equal(verify_matches(p0, p1, "essential", 1.0),
                          verify_matches(p0, p1, "fundamental", 1.0))


def test_essential_degenerate_input_gives_no_inliers():
    camera = camera_from_info(K.ravel(), [], "plumb_bob")
    assert not verify_matches(np.zeros((4, 2)), np.ones((4, 2)), "essential", 1.0, camera).any()
    same = np.tile([[100.0, 100.0]], (20, 1))
    assert verify_matches(same, same, "essential", 1.0, camera).shape == (20,)


@pytest.mark.parametrize("k, d, model, message", [
    ([0.0] * 9, [], "plumb_bob", "intrinsics"),
    (K.ravel(), [], "kannala", "not supported"),
    (K.ravel(), [0.1, 0.2], "equidistant", "4 coefficients"),
    (K.ravel()[:4], [], "plumb_bob", "intrinsics"),
])
def test_camera_from_info_rejects_unusable_calibration(k, d, model, message):
    with pytest.raises(ValueError, match=message):
        camera_from_info(k, d, model)


def test_calibration_gate_refuses_another_image_size_once():
    """K of 1280x720 is not used for 640x480 frames (one warning naming both sizes), is
    used for 1280x720 frames; a CameraInfo without a size (0x0) is used as it is."""
    from kp_ros.core.geometry import CalibrationGate
    gate = CalibrationGate()
    assert gate.for_image(640, 480) == (None, None)  # no calibration: nothing to say
    gate.camera = camera_from_info(K.ravel(), [], "plumb_bob", 1280, 720)
    camera, warning = gate.for_image(640, 480)
    assert camera is None and "1280x720" in warning and "640x480" in warning
    assert gate.for_image(640, 480) == (None, None)  # said once
    assert gate.for_image(1280, 720) == (gate.camera, None)
    assert gate.for_image(640, 480)[1] is not None  # a new refusal after a fit is said again
    gate.camera = camera_from_info(K.ravel(), [], "plumb_bob", 0, 0)
    assert gate.for_image(640, 480) == (gate.camera, None)


def test_camera_info_key_treats_nan_calibrations_as_equal():
    from kp_ros.core.geometry import camera_info_key
    nan = [float("nan")] * 9
    assert camera_info_key(nan, [0.0] * 5, "plumb_bob", 640, 480) == \
        camera_info_key(list(nan), [0.0] * 5, "plumb_bob", 640, 480)
    assert camera_info_key(nan, [], "", 640, 480) != camera_info_key(nan, [], "", 640, 481)


def test_camera_info_cache_judges_each_calibration_once():
    """A driver repeats its CameraInfo with every frame: only a new calibration is judged,
    a broken one gives no camera and its reason, rectified takes P without distortion."""
    from types import SimpleNamespace
    from kp_ros.core.geometry import CameraInfoCache
    k = [300.0, 0, 320, 0, 300, 240, 0, 0, 1]
    p = [280.0, 0, 330, -28.0, 0, 280, 250, 0, 0, 0, 1, 0]
    info = SimpleNamespace(k=k, d=[0.1, 0, 0, 0, 0], distortion_model="plumb_bob", p=p, width=640, height=480)
    cache = CameraInfoCache()
    assert cache.update(info) and cache.camera.K[0, 0] == 300.0 and cache.problem is None
    assert not cache.update(SimpleNamespace(**vars(info)))  # the same calibration again
    broken = SimpleNamespace(**{**vars(info), "d": [float("nan")] * 5})
    assert cache.update(broken) and cache.camera is None and "not finite" in cache.problem
    assert not cache.update(broken)
    rectified = CameraInfoCache(rectified=True)
    assert rectified.update(info)
    assert rectified.camera.K[0, 0] == 280.0 and rectified.camera.K[0, 2] == 330 and len(rectified.camera.D) == 0
    assert rectified.update(SimpleNamespace(**{**vars(info), "p": [281.0] + p[1:]}))  # P changed: judged again
