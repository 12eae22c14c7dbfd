"""EfficientLoFTR correspondences against ground truth, without trained weights.

Random weights cannot show whether correspondences are right, so the learned features
are swapped for hand-made, shift-equivariant ones (``HandMadeFeatureMatcher``), a frame
is moved by a known motion, and every returned pair is checked against it. The coarse,
matching and refinement code under test is kp_ros's own; only the feature maps are fake:
  - coarse (1/8): each cell's 7x7-cell neighbourhood of the 1/8-resolution image (cell c
    averages pixels [8c-4, 8c+4)), zero-mean, unit norm: similar under sub-cell shifts.
  - fine (full res, 8 + 8 channels): random zero-mean 8x8 filters of the lightly blurred
    image. They follow the trained model's pixel conventions, which EfficientLoFTR's
    coordinates assume: fine pixel k describes the image around k - 3.5 (the 8x8 window
    of cell c, pixels [8c, 8c+8), is read as centred on the coarse point 8c), and the
    newer frame's 3x3 sub-pixel patch is read one pixel up-left of the stage-1 pixel, so
    its stage-2 channels describe k - 2.5. (Without that shift the results move by ~0.9 px,
    a check that the convention is understood.)

Measured (tiny config, 224x320 crops, threshold 0.05; median / 90th percentile error px):

    motion                 kp_ros, TUM frame 0   kp_ros, synthetic   stock transformers 5.23
    shift (16, 8) cells    0.18 / 0.41           0.26 / 0.46         0-1 (order happens to agree)
    shift (5, 3)           0.21 / 6.9            0.24 / 1.6          13-68
    shift (21, -13)        0.22 / 8.8            0.24 / 1.6          29-91
    rotation 8 deg         0.76 / 7.7            0.47 / 1.3          22-75

The stock path (model forward + post_process_keypoint_matching, fed the same features)
pairs slot p's image-0 match i(p) with slot p's image-1 match j(p) (two different
correspondences), returns the stage-1 fine offset of window pixel 0 for every match and
truncates to int. For a cell-aligned translation the two slot orders happen to line up,
so it is only off for the other motions; that is what the companion checks pin.
"""
from __future__ import annotations

from unittest import mock

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_frame
from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher, FrameFeatures

HEIGHT, WIDTH = 224, 320  # crop size, divisible by 32: model pixels == source pixels
THRESHOLD = 0.05
COARSE_RADIUS = 3         # 7x7 cells
COARSE_SHARPNESS = 40.0   # similarity = sharpness * cosine, before the temperature
FINE_SCALE = 20.0
_GENERATOR = torch.Generator().manual_seed(0)
_FINE_FILTERS = torch.randn(16, 1, 8, 8, generator=_GENERATOR)
_FINE_FILTERS -= _FINE_FILTERS.mean(dim=(-1, -2), keepdim=True)


def coarse_features(pixels: torch.Tensor, temperature: float) -> torch.Tensor:
    """(1, 1, h, w) -> (1, 49, h/8, w/8): normalised low-resolution neighbourhoods."""
    height, width = pixels.shape[-2] // 8, pixels.shape[-1] // 8
    low = F.avg_pool2d(F.pad(pixels, (4, 4, 4, 4), mode="replicate"), 8)[..., :height, :width]
    size = 2 * COARSE_RADIUS + 1
    patches = F.unfold(F.pad(low, (COARSE_RADIUS,) * 4, mode="replicate"), size)
    patches = F.normalize(patches - patches.mean(1, keepdim=True), dim=1)
    # coarse_confidence divides each side by sqrt(C) and the product by the temperature.
    gain = (COARSE_SHARPNESS * size * size * temperature) ** 0.5
    return (patches * gain).reshape(1, size * size, height, width)


def fine_features(pixels: torch.Tensor, newer: bool) -> torch.Tensor:
    """(1, 1, h, w) -> (1, 16, h, w): channels 0-7 stage 1, 8-15 stage 2 (see docstring)."""
    blurred = cv2.GaussianBlur(pixels[0, 0].numpy(), (0, 0), 1.0)
    blurred = torch.from_numpy(blurred)[None, None]

    def centred_at(offset: int) -> torch.Tensor:  # output k covers pixels [k-7+o, k+o]
        padded = F.pad(blurred, (7 - offset, offset, 7 - offset, offset), mode="replicate")
        return F.conv2d(padded, _FINE_FILTERS)

    stage1 = centred_at(0)[:, :8]
    stage2 = centred_at(1 if newer else 0)[:, 8:]
    return torch.cat([F.normalize(stage1, dim=1), F.normalize(stage2, dim=1)], 1) * FINE_SCALE


class HandMadeFeatureMatcher(EfficientLoFTRStreamMatcher):
    """kp_ros's matcher with the learned backbone, transformer and fine fusion swapped out."""

    def extract(self, preprocessed):
        pixels, source_size = preprocessed
        temperature = self.config.coarse_matching_temperature
        fine = (fine_features(pixels, newer=False), fine_features(pixels, newer=True))
        return FrameFeatures(coarse=coarse_features(pixels, temperature), residuals=fine,
                             model_size=tuple(pixels.shape[-2:]), source_size=tuple(source_size))

    def transform(self, features0, features1):
        return features0.coarse, features1.coarse

    def fine_maps(self, coarse0, coarse1, features0, features1):
        return features0.residuals[0], features1.residuals[1]


def shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def rotation(degrees: float) -> np.ndarray:
    return cv2.getRotationMatrix2D(((WIDTH - 1) / 2, (HEIGHT - 1) / 2), degrees, 1.0)


MOTIONS = {  # name: (2x3 affine p1 = A p0 in crop pixels, bound on the median error)
    "cell_aligned_shift": (shift(16, 8), 0.5),
    "sub_cell_shift": (shift(5, 3), 0.6),
    "large_shift": (shift(21, -13), 0.6),
    "rotation_8deg": (rotation(8.0), 1.0),
}


def moved_pair(frame: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre crops of ``frame`` and of ``frame`` moved by ``affine`` (crop coordinates):
    the crop keeps warped borders out of view."""
    top, left = (frame.shape[0] - HEIGHT) // 2, (frame.shape[1] - WIDTH) // 2
    to_frame = np.array([[1.0, 0, left], [0, 1.0, top], [0, 0, 1.0]])
    full = to_frame @ np.vstack([affine, [0, 0, 1]]) @ np.linalg.inv(to_frame)
    moved = cv2.warpAffine(frame, full[:2], (frame.shape[1], frame.shape[0]), flags=cv2.INTER_LINEAR)
    crop = (slice(top, top + HEIGHT), slice(left, left + WIDTH))
    return np.ascontiguousarray(frame[crop]), np.ascontiguousarray(moved[crop])


def errors(points0, points1, affine: np.ndarray) -> np.ndarray:
    points0, points1 = np.asarray(points0, np.float64), np.asarray(points1, np.float64)
    return np.linalg.norm(points1 - (points0 @ affine[:, :2].T + affine[:, 2]), axis=1)


@pytest.fixture(params=["tum", "synthetic"])
def frame(request) -> np.ndarray:
    if request.param == "tum":
        return request.getfixturevalue("tum_frames")[0]
    return synthetic_frame(480, 640, seed=3)


@pytest.fixture(scope="module")
def matcher(tiny_eloftr_dir) -> HandMadeFeatureMatcher:
    return HandMadeFeatureMatcher(str(tiny_eloftr_dir), device="cpu", match_threshold=THRESHOLD,
                                  resize="native")


@pytest.fixture(scope="module")
def stock(tiny_eloftr_dir):
    from transformers import AutoImageProcessor, EfficientLoFTRForKeypointMatching
    model = EfficientLoFTRForKeypointMatching.from_pretrained(str(tiny_eloftr_dir)).eval()
    model.config.coarse_matching_threshold = THRESHOLD
    return model, AutoImageProcessor.from_pretrained(str(tiny_eloftr_dir))


def stock_matches(stock, matcher, image0, image1) -> dict:
    """model(...) + post_process_keypoint_matching, fed the hand-made features."""
    from transformers.modeling_outputs import BackboneOutput
    model, processor = stock
    with torch.inference_mode():
        features0 = matcher.extract(matcher.preprocess(image0))
        features1 = matcher.extract(matcher.preprocess(image1))
        coarse = torch.stack([features0.coarse, features1.coarse], 1)
        fine = torch.cat(matcher.fine_maps(None, None, features0, features1))

        def backbone(pixel_values, **kwargs):
            return BackboneOutput(feature_maps=(coarse, None, None))

        with mock.patch.object(model.efficientloftr, "forward", backbone), \
                mock.patch.object(model.refinement_layer, "forward_pyramid", lambda *args: fine):
            outputs = model(pixel_values=torch.zeros(1, 2, 1, HEIGHT, WIDTH))
        return outputs, processor.post_process_keypoint_matching(
            outputs, [[(HEIGHT, WIDTH), (HEIGHT, WIDTH)]], threshold=THRESHOLD)[0]


@pytest.mark.parametrize("motion", list(MOTIONS))
def test_correspondences_follow_the_motion(matcher, frame, motion):
    affine, bound = MOTIONS[motion]
    image0, image1 = moved_pair(frame, affine)
    result = matcher.match_pair(image0, image1)
    assert len(result["scores"]) >= 100, "too few matches to judge"
    error = errors(result["keypoints0"], result["keypoints1"], affine)
    assert np.median(error) < bound, f"{motion}: median error {np.median(error):.2f} px"
    assert np.mean(error < 2.0) > 0.75, f"{motion}: only {np.mean(error < 2.0):.0%} within 2 px"


def test_stream_gives_the_same_correspondences(matcher, frame):
    affine = MOTIONS["sub_cell_shift"][0]
    image0, image1 = moved_pair(frame, affine)
    matcher.reset()
    assert matcher.push(image0) is None
    streamed = matcher.push(image1)
    paired = matcher.match_pair(image0, image1)
    for key in ("keypoints0", "keypoints1", "scores"):
        assert np.array_equal(streamed[key], paired[key])


def test_refinement_moves_points_off_the_grid(matcher, frame):
    """Stage 1 moves both points by whole pixels within their windows (not always the
    same pixel, as in the stock path); stage 2 moves the newer one by a fraction."""
    image0, image1 = moved_pair(frame, MOTIONS["sub_cell_shift"][0])
    result = matcher.match_pair(image0, image1)
    phase0 = np.remainder(result["keypoints0"] + 3.5, 8)  # window pixel of each point
    assert len(np.unique(phase0, axis=0)) > 8
    fraction1 = np.remainder(result["keypoints1"] + 3.5, 1.0)
    assert ((fraction1 > 0.01) & (fraction1 < 0.99)).any(axis=1).mean() > 0.5


@pytest.mark.parametrize("motion", ["sub_cell_shift", "large_shift", "rotation_8deg"])
def test_stock_transformers_pairs_are_off(stock, matcher, frame, motion):
    """Companion: documents how far the stock path is off on the same input. If this
    fails, transformers may have fixed the EfficientLoFTR slot pairing and can become the
    reference again (compare its output with kp_ros's and update the module docstring)."""
    affine = MOTIONS[motion][0]
    image0, image1 = moved_pair(frame, affine)
    _, result = stock_matches(stock, matcher, image0, image1)
    error = errors(result["keypoints0"], result["keypoints1"], affine)
    assert len(error) >= 100
    assert np.median(error) > 10.0, (
        f"stock transformers median error is {np.median(error):.1f} px on {motion}: it may "
        "have fixed the pairing bug; re-check it as the reference")


def test_stock_transformers_stage1_offsets_are_constant(stock, matcher, frame):
    """Companion: the stock fine stage gathers the stage-1 offsets along the match axis
    (and takes its dual softmax over matches), so every image-0 keypoint sits at 8c - 3.5.
    If this fails, transformers may have fixed its fine matching: re-check it."""
    image0, image1 = moved_pair(frame, MOTIONS["sub_cell_shift"][0])
    outputs, _ = stock_matches(stock, matcher, image0, image1)
    valid = outputs.matches[0, 0] > -1
    keypoints0 = outputs.keypoints[0, 0][valid] * torch.tensor([WIDTH, HEIGHT])
    phase = torch.remainder(keypoints0 + 3.5, 8)
    assert valid.sum() >= 100
    assert torch.allclose(phase, torch.zeros_like(phase), atol=1e-3) or \
        torch.allclose(phase, torch.full_like(phase, 8.0), atol=1e-3), \
        "stock stage-1 fine offsets vary: transformers may have fixed its fine matching"
