"""Property tests of the source <-> model coordinate mapping (kp_ros/core/preprocess.py)
and of the detector's and matcher's outputs on random small images of any size: every
point inside the source image, array lengths consistent, values finite.

Few examples each (tiny models, small images); test_preprocess.py holds the exact
parity checks against the reference at fixed sizes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import synthetic_frame
from kp_ros.core.preprocess import MAX_NATIVE_PIXELS, MODEL_SIZE, scale_to_model, scale_to_source, target_size

sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))
small_sizes = st.tuples(st.integers(1, 96), st.integers(1, 96))


# --- target_size ----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(size=sizes, multiple=st.sampled_from([1, 8, 32, 7]))
def test_native_target_size_is_the_nearest_allowed_multiple(size, multiple):
    target = target_size("native", *size, multiple)
    for source, model in zip(size, target):
        assert model % multiple == 0 and model >= multiple
        if size[0] * size[1] > MAX_NATIVE_PIXELS:
            assert target[0] * target[1] <= MAX_NATIVE_PIXELS  # capped
        elif source >= multiple:
            assert abs(model - source) <= multiple / 2  # the nearest multiple
        else:
            assert model == multiple


@settings(max_examples=50, deadline=None)
@given(size=sizes, multiple=st.sampled_from([8, 32]))
def test_model_target_size_is_fixed(size, multiple):
    assert target_size("model", *size, multiple) == MODEL_SIZE


@given(policy=st.text(max_size=8).filter(lambda p: p not in ("model", "native")))
@settings(max_examples=20, deadline=None)
def test_unknown_policy_is_a_value_error(policy):
    with pytest.raises(ValueError, match="resize policy"):
        target_size(policy, 10, 10, 8)


# --- scale_to_source / scale_to_model -------------------------------------------------------

def points_in(size, seed: int, count: int = 20) -> torch.Tensor:
    """``count`` float32 (x, y) in [0, w-1] x [0, h-1], corners included."""
    height, width = size
    rng = np.random.default_rng(seed)
    points = rng.random((count, 2)) * [width - 1, height - 1]
    corners = [[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]]
    return torch.from_numpy(np.concatenate([points, corners])).float()


@settings(max_examples=200, deadline=None)
@given(model=sizes, source=sizes, seed=st.integers(0, 2**16))
@example(model=(480, 640), source=(3000, 4000), seed=0)
@example(model=(480, 640), source=(1, 1), seed=0)
def test_model_pixels_map_inside_the_source_image(model, source, seed):
    """Any model-resolution point in [0, w-1] x [0, h-1] lands in the source image, which
    spans [-0.5, W - 0.5] x [-0.5, H - 0.5] with pixel centres at integers."""
    points = points_in(model, seed)
    mapped = scale_to_source(points, model, source)
    assert mapped.dtype == torch.float32 and mapped.shape == points.shape
    assert_inside(mapped.numpy(), source)


@settings(max_examples=200, deadline=None)
@given(model=sizes, source=sizes, seed=st.integers(0, 2**16))
def test_scaling_round_trips_and_keeps_order(model, source, seed):
    points = points_in(model, seed)
    there = scale_to_source(points, model, source)
    torch.testing.assert_close(scale_to_model(there, model, source), points, rtol=1e-5, atol=1e-4)
    back = scale_to_source(scale_to_model(there, model, source), model, source)
    torch.testing.assert_close(back, there, rtol=1e-5, atol=1e-4)
    # Monotonic per axis: the mapping never reorders points.
    for axis in (0, 1):
        order = torch.argsort(points[:, axis], stable=True)
        assert (torch.diff(there[order, axis]) >= 0).all()


@settings(max_examples=50, deadline=None)
@given(size=sizes, seed=st.integers(0, 2**16))
def test_equal_sizes_map_points_to_themselves(size, seed):
    points = points_in(size, seed)
    torch.testing.assert_close(scale_to_source(points, size, size), points, rtol=1e-6, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(model=sizes, source=sizes, seed=st.integers(0, 2**16))
def test_integer_types_and_empty_inputs(model, source, seed):
    points = points_in(model, seed).round().to(torch.int64)
    torch.testing.assert_close(scale_to_source(points, model, source),
                               scale_to_source(points.float(), model, source))
    assert scale_to_source(torch.zeros(0, 2), model, source).shape == (0, 2)


# --- detector and matcher outputs on random images ---------------------------------------------

def random_image(size, seed: int, color: bool) -> np.ndarray:
    """Texture (blobs and edges, so the models find something) or, for tiny sizes, noise."""
    height, width = size
    image = synthetic_frame(height, width, seed=seed)
    return image if color else np.ascontiguousarray(image[..., 1])


def assert_inside(points: np.ndarray, size) -> None:
    """Inside [-0.5, W - 0.5] x [-0.5, H - 0.5]: the image's extent, pixel centres at integers."""
    height, width = size
    assert np.isfinite(points).all()
    outside = ((points < -0.5).any(1) | (points[:, 0] > width - 0.5) | (points[:, 1] > height - 0.5))
    assert not outside.any(), f"points outside {width}x{height}: {points[outside]}"


@pytest.fixture(scope="module")
def detector(tiny_superpoint_dir):
    from kp_ros.core.superpoint import SuperPointDetector
    return SuperPointDetector(str(tiny_superpoint_dir), device="cpu", keypoint_threshold=0.0,
                              max_keypoints=200)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=small_sizes, seed=st.integers(0, 1000), color=st.booleans(), resize=st.sampled_from(["native", "model"]))
@example(size=(1, 1), seed=0, color=True, resize="model")
@example(size=(7, 13), seed=0, color=False, resize="native")
def test_superpoint_keypoints_inside_any_source_image(detector, size, seed, color, resize):
    detector.set_params(resize=resize)
    result = detector.detect(random_image(size, seed, color))
    n = len(result["scores"])
    assert result["keypoints"].shape == (n, 2) and result["descriptors"].shape == (n, detector.descriptor_size)
    assert_inside(result["keypoints"], size)
    assert (result["scores"][:-1] >= result["scores"][1:]).all() and np.isfinite(result["scores"]).all()
    if n:
        np.testing.assert_allclose(np.linalg.norm(result["descriptors"], axis=1), np.ones(n), atol=1e-4, rtol=0)
    if resize == "model":
        assert n > 0, "480x640 always leaves room for keypoints at threshold 0"


@pytest.fixture(scope="module")
def matcher(tmp_path_factory):
    """Seed 1 gives random weights with many mutual nearest neighbours (see test_eloftr.py)."""
    from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher
    from kp_ros.core.random_init import save_random_eloftr
    model = save_random_eloftr(tmp_path_factory.mktemp("eloftr_props"), "tiny", seed=1)
    return EfficientLoFTRStreamMatcher(str(model), device="cpu", match_threshold=0.0, resize="native")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=small_sizes, seed=st.integers(0, 1000), color=st.booleans(),
       shift=st.tuples(st.integers(0, 6), st.integers(0, 6)))
@example(size=(96, 96), seed=0, color=True, shift=(0, 0))
@example(size=(1, 1), seed=0, color=True, shift=(0, 0))
def test_eloftr_matches_inside_any_source_image(matcher, size, seed, color, shift):
    height, width = size
    image0 = random_image(size, seed, color)
    image1 = synthetic_frame(height, width, seed=seed, shift=shift)
    image1 = image1 if color else np.ascontiguousarray(image1[..., 1])
    result = matcher.match_pair(image0, image1)
    n = len(result["scores"])
    assert result["keypoints0"].shape == result["keypoints1"].shape == (n, 2)
    assert np.isfinite(result["scores"]).all()
    assert_inside(result["keypoints0"], size)
    assert_inside(result["keypoints1"], size)
    if min(size) >= 64 and shift == (0, 0):
        assert n > 0, "a textured frame matched with itself"


@pytest.mark.parametrize("size,textured", [((7, 13), False), ((500, 2), True)])
def test_eloftr_at_model_size_maps_matches_inside_the_source(matcher, size, textured):
    """resize 'model' (the node default): a 480x640 run mapped back to any source size."""
    matcher.set_params(resize="model")
    try:
        image = random_image(size, 3, True)
        result = matcher.match_pair(image, image)
    finally:
        matcher.set_params(resize="native")
    # An upsampled 1x1 or 7x13 frame is (nearly) flat: no matches is a valid answer there.
    assert len(result["scores"]) > 0 or not textured
    assert_inside(result["keypoints0"], size)
    assert_inside(result["keypoints1"], size)
