"""Debug drawings: keypoints and matches on RGB uint8 images (OpenCV, no matplotlib).

Speed: points and lines are grouped into a few score bins and each bin is drawn with
one ``cv2.polylines`` call (a 2-point polyline with equal ends is a round dot), so
thousands of keypoints cost a few milliseconds instead of one Python call each.
"""
from __future__ import annotations

import cv2
import numpy as np

SCORE_BINS = 16  # colour levels: one cv2 call per bin (and radius)
KEYPOINT_MAX_RADIUS = 4  # the best keypoint's dot radius; the weakest get 1
KEYPOINT_ALPHA = 0.6  # dots blended over the image, like the guide's scatter(alpha=0.4), a bit stronger
MATCH_THICKNESS = 2
OUTLIER_RGB = (128, 128, 128)  # outliers: thin grey lines under the inliers
ENDPOINT_RGB = (0, 0, 0)  # black endpoints, as the reference visualize_keypoint_matching


def draw_keypoints(image_rgb: np.ndarray, keypoints_xy: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Dots sized and coloured (turbo colormap) by score relative to the frame's best;
    stronger keypoints drawn on top. Returns a new RGB uint8 image."""
    canvas = as_rgb(image_rgb)
    points = _as_points(keypoints_xy)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(points) != len(scores):
        raise ValueError(f"{len(points)} keypoints but {len(scores)} scores")
    if len(points) == 0:
        return canvas
    relative = _relative(scores)
    radius = 1 + np.rint((KEYPOINT_MAX_RADIUS - 1) * np.sqrt(relative)).astype(np.int32)
    level = np.rint(relative * (SCORE_BINS - 1)).astype(np.int32)
    colours = _turbo_rgb()
    dots = np.repeat(points[:, None, :], 2, axis=1)  # (N, 2, 2): zero-length polylines
    overlay = canvas.copy()
    for bin_ in np.unique(level):  # ascending: the strongest are drawn last, on top
        in_bin = level == bin_
        for r in np.unique(radius[in_bin]):
            selected = dots[in_bin & (radius == r)]
            cv2.polylines(overlay, selected, False, colours[bin_], int(2 * r))
    return cv2.addWeighted(overlay, KEYPOINT_ALPHA, canvas, 1.0 - KEYPOINT_ALPHA, 0.0)


def draw_matches(image0_rgb: np.ndarray, image1_rgb: np.ndarray, points0_xy: np.ndarray,
                 points1_xy: np.ndarray, scores: np.ndarray, inliers: np.ndarray | None = None
                 ) -> np.ndarray:
    """The two images side by side (top-aligned, zero padded) with one line per match,
    coloured like the reference ``visualize_keypoint_matching``: (255(1-s), 255 s, 0),
    red = weak, green = strong. ``inliers`` (bool, N) draws outliers as thin grey lines."""
    left, right = as_rgb(image0_rgb), as_rgb(image1_rgb)
    height = max(left.shape[0], right.shape[0])
    canvas = np.zeros((height, left.shape[1] + right.shape[1], 3), np.uint8)
    canvas[:left.shape[0], :left.shape[1]] = left
    canvas[:right.shape[0], left.shape[1]:] = right
    points0 = _as_points(points0_xy)
    points1 = _as_points(points1_xy) + np.array([left.shape[1], 0], np.int32)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if not len(points0) == len(points1) == len(scores):
        raise ValueError(f"{len(points0)} / {len(points1)} points and {len(scores)} scores")
    if len(scores) == 0:
        return canvas
    inliers = np.ones(len(scores), bool) if inliers is None else np.asarray(inliers, bool).reshape(-1)
    if len(inliers) != len(scores):
        raise ValueError(f"{len(inliers)} inlier flags for {len(scores)} matches")
    segments = np.stack([points0, points1], axis=1)  # (N, 2, 2)
    if (~inliers).any():
        cv2.polylines(canvas, segments[~inliers], False, OUTLIER_RGB, 1)
    level = np.rint(np.clip(scores, 0.0, 1.0) * (SCORE_BINS - 1)).astype(np.int32)
    for bin_ in np.unique(level[inliers]):
        score = bin_ / (SCORE_BINS - 1)
        colour = (int(255 * (1 - score)), int(255 * score), 0)
        cv2.polylines(canvas, segments[inliers & (level == bin_)], False, colour, MATCH_THICKNESS)
    ends = np.concatenate([points0, points1])
    cv2.polylines(canvas, np.repeat(ends[:, None, :], 2, axis=1), False, ENDPOINT_RGB, 4)
    return canvas


TRACK_COLOURS = 16  # track trails: colour = id mod this, one cv2 call per colour
NEW_TRACK_RGB = (255, 255, 255)  # keypoints that start a track: small white dots


def draw_tracks(image_rgb: np.ndarray, trails: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Track trails over the newest frame: ``trails`` (N, L, 2) positions of N tracks, the
    newest first, NaN where a track is shorter than L; ``ids`` (N,) colour them (same id,
    same colour in every frame). Tracks seen once are white dots. Returns a new RGB image."""
    canvas = as_rgb(image_rgb)
    trails = np.asarray(trails, np.float64).reshape(len(ids), -1, 2)
    ids = np.asarray(ids, np.uint64).reshape(-1)
    if not len(ids):
        return canvas
    seen = np.isfinite(trails).all(2)  # (N, L); a track's known positions are a prefix
    length = seen.sum(1)
    # Pad each trail with its oldest known position, so one polyline per track is valid.
    oldest = trails[np.arange(len(ids)), np.maximum(length - 1, 0)]
    filled = np.where(seen[..., None], trails, oldest[:, None, :])
    points = np.rint(filled).astype(np.int32)
    single = length == 1
    if single.any():
        cv2.polylines(canvas, np.repeat(points[single, :1], 2, axis=1), False, NEW_TRACK_RGB, 2)
    colours = cv2.applyColorMap(np.linspace(0, 255, TRACK_COLOURS).astype(np.uint8)[:, None],
                                cv2.COLORMAP_HSV)[:, 0, ::-1]
    level = (ids % np.uint64(TRACK_COLOURS)).astype(np.int64)
    for colour in np.unique(level[~single]):
        chosen = ~single & (level == colour)
        rgb = tuple(int(c) for c in colours[colour])
        cv2.polylines(canvas, list(points[chosen]), False, rgb, 1)
        heads = np.repeat(points[chosen, :1], 2, axis=1)
        cv2.polylines(canvas, heads, False, rgb, 4)
    return canvas


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A contiguous HxWx3 uint8 copy of an HxW, HxWx1 or HxWx3 uint8 image."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {image.shape}")
    return np.array(image, order="C", copy=True)


def _as_points(points_xy) -> np.ndarray:
    """(N, 2) float x, y (numpy or CPU torch) -> (N, 2) int32 nearest pixels."""
    points = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    return np.rint(points).astype(np.int32)


def _relative(scores: np.ndarray) -> np.ndarray:
    """Scores / the best score, in [0, 1] (all 1 when the best is not positive)."""
    best = float(scores.max())
    if not best > 0:
        return np.ones_like(scores)
    return np.clip(scores / best, 0.0, 1.0)


def _turbo_rgb() -> list[tuple[int, int, int]]:
    """SCORE_BINS colours from OpenCV's turbo colormap (blue = weak, red = strong), RGB."""
    ramp = np.linspace(0, 255, SCORE_BINS).astype(np.uint8)[:, None]
    bgr = cv2.applyColorMap(ramp, cv2.COLORMAP_TURBO)[:, 0]
    return [tuple(int(c) for c in colour[::-1]) for colour in bgr]
