"""kp_ros.core.visualize: shapes, empty inputs, and that drawing lands where it should."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kp_ros.core.visualize import OUTLIER_RGB, as_rgb, draw_keypoints, draw_matches


def gray_image(height=120, width=160, value=100) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


# --- draw_keypoints -------------------------------------------------------------------------

def test_keypoints_shape_dtype_and_input_untouched():
    image = gray_image()
    before = image.copy()
    out = draw_keypoints(image, np.array([[10.0, 20.0], [80.4, 60.6]]), np.array([0.1, 0.9]))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(image, before)


def test_keypoints_change_pixels_only_near_the_keypoints():
    image = gray_image()
    points = np.array([[20.0, 30.0], [100.2, 80.7]])
    out = draw_keypoints(image, points, np.array([0.2, 0.8]))
    changed = np.any(out != image, axis=2)
    for x, y in np.rint(points).astype(int):
        assert changed[y, x]
    ys, xs = np.nonzero(changed)
    centres = np.rint(points)
    distance = np.hypot(xs[:, None] - centres[:, 0], ys[:, None] - centres[:, 1]).min(axis=1)
    assert distance.max() <= 5  # within the biggest dot's radius (4) + rasterization


def test_keypoints_stronger_score_draws_a_bigger_dot():
    image = gray_image()
    out = draw_keypoints(image, np.array([[30.0, 60.0], [120.0, 60.0]]), np.array([0.01, 1.0]))
    changed = np.any(out != image, axis=2)
    assert changed[:, 100:].sum() > 2 * changed[:, :100].sum()


def test_keypoints_empty_returns_an_unchanged_copy():
    image = gray_image()
    out = draw_keypoints(image, np.zeros((0, 2), np.float32), np.zeros((0,), np.float32))
    assert np.array_equal(out, image) and out is not image


def test_keypoints_accept_mono_images_and_torch_tensors():
    mono = np.full((40, 50), 7, np.uint8)
    out = draw_keypoints(mono, torch.tensor([[25.0, 20.0]]), torch.tensor([0.5]))
    assert out.shape == (40, 50, 3) and (out[20, 25] != 7).any()


def test_keypoints_length_mismatch_raises():
    with pytest.raises(ValueError):
        draw_keypoints(gray_image(), np.zeros((3, 2)), np.zeros(2))


# --- draw_matches -------------------------------------------------------------------------

def test_matches_side_by_side_with_padding():
    left, right = gray_image(120, 160, 50), gray_image(90, 100, 200)
    out = draw_matches(left, right, np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0))
    assert out.shape == (120, 260, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:, :160], left)
    assert np.array_equal(out[:90, 160:], right) and not out[90:, 160:].any()


def test_matches_draw_a_line_coloured_by_score():
    left, right = gray_image(value=0), gray_image(value=0)
    points0, points1 = np.array([[10.0, 40.0], [10.0, 100.0]]), np.array([[150.0, 40.0], [150.0, 100.0]])
    out = draw_matches(left, right, points0, points1, np.array([1.0, 0.0]))
    # midway along each horizontal line (x = (10 + 160 + 150) / 2 = 160)
    assert tuple(out[40, 160]) == (0, 255, 0)  # strong: green, as the reference's _get_color
    assert tuple(out[100, 160]) == (255, 0, 0)  # weak: red
    assert tuple(out[40, 10]) == (0, 0, 0)  # black endpoint dots
    assert tuple(out[70, 160]) == (0, 0, 0)  # nothing between the lines


def test_matches_outliers_are_drawn_grey_and_thin():
    left, right = gray_image(value=0), gray_image(value=0)
    points0, points1 = np.array([[10.0, 40.0], [10.0, 100.0]]), np.array([[150.0, 40.0], [150.0, 100.0]])
    out = draw_matches(left, right, points0, points1, np.array([1.0, 1.0]), inliers=np.array([True, False]))
    assert tuple(out[40, 160]) == (0, 255, 0)
    assert tuple(out[100, 160]) == OUTLIER_RGB
    column = np.any(out[:, 160] != 0, axis=1)
    assert column[95:106].sum() < column[35:46].sum()  # thinner than the inlier line


def test_matches_mono_inputs_and_mismatched_lengths():
    out = draw_matches(np.zeros((30, 40), np.uint8), np.zeros((30, 40, 1), np.uint8),
                       np.array([[5.0, 5.0]]), np.array([[35.0, 25.0]]), np.array([0.5]))
    assert out.shape == (30, 80, 3) and out.any()
    with pytest.raises(ValueError):
        draw_matches(gray_image(), gray_image(), np.zeros((2, 2)), np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError):
        draw_matches(gray_image(), gray_image(), np.zeros((2, 2)), np.zeros((2, 2)), np.zeros(2),
                     inliers=np.ones(3, bool))


def test_as_rgb_rejects_other_images():
    with pytest.raises(ValueError):
        as_rgb(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError):
        as_rgb(np.zeros((4, 4, 3), np.float32))
