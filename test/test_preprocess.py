"""kp_ros.core.preprocess against the reference SuperPoint processor (PIL backend)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kp_ros.core.preprocess import (MAX_NATIVE_PIXELS, MODEL_SIZE, image_to_tensor, preprocess_gray,
                                    resize_like_pil, scale_to_model, scale_to_source, target_size)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def processor(tiny_superpoint_dir):
    from transformers import AutoImageProcessor
    return AutoImageProcessor.from_pretrained(tiny_superpoint_dir, do_grayscale=True)


@pytest.fixture(scope="module")
def stock_processor(tiny_superpoint_dir):
    """As shipped: do_grayscale=False, so the model reads the R channel."""
    from transformers import AutoImageProcessor
    return AutoImageProcessor.from_pretrained(tiny_superpoint_dir)


def random_image(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def reference_pixels(processor, image: np.ndarray) -> torch.Tensor:
    """The processor's (1, 1, h, w) input as the model sees it (channel 0); mono goes in
    as a PIL 'L' image because the processor cannot infer channels of a bare HxW array."""
    source = Image.fromarray(image) if image.ndim == 2 else image
    return processor(source, return_tensors="pt")["pixel_values"][:, :1]


# --- image_to_tensor ----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(12, 16), (12, 16, 1), (12, 16, 3)])
def test_image_to_tensor_layout(shape):
    image = random_image(shape)
    tensor = image_to_tensor(image, CPU)
    channels = 1 if len(shape) == 2 else shape[2]
    assert tensor.shape == (1, channels, 12, 16) and tensor.dtype == torch.float32
    expected = image.reshape(12, 16, channels).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(tensor[0].numpy(), expected)


def test_image_to_tensor_accepts_read_only_arrays():
    image = random_image((8, 8, 3))
    image.setflags(write=False)
    assert image_to_tensor(image, "cpu").shape == (1, 3, 8, 8)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4,), np.uint8)])
def test_image_to_tensor_rejects_other_images(bad):
    with pytest.raises(ValueError):
        image_to_tensor(bad, CPU)


# --- target_size ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["color", "gray", "mono", "every value"])
def test_gray_lookup_equals_the_elementwise_torch_ops(kind):
    """The CPU path (cv2.LUT) and the one other devices run (torch ops) agree bit for bit."""
    from kp_ros.core.preprocess import _gray_by_lookup, _gray_elementwise
    rng = np.random.default_rng(1)
    planes = {"color": rng.integers(0, 256, (3, 37, 53), dtype=np.uint8),
              "gray": np.repeat(rng.integers(0, 256, (1, 37, 53), dtype=np.uint8), 3, axis=0),
              "mono": rng.integers(0, 256, (1, 37, 53), dtype=np.uint8),
              # every value in every channel, against every value in the others
              "every value": np.stack(list(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"))
                                      + [(np.arange(256)[:, None] * 7 + np.arange(256)) % 256]
                                      ).astype(np.uint8)}[kind]
    expected = _gray_elementwise(torch.from_numpy(planes)).numpy()
    assert np.array_equal(_gray_by_lookup(planes).view(np.uint32), expected.view(np.uint32))


def test_target_size_model_is_the_processor_size(processor):
    assert target_size("model", 123, 457, 8) == MODEL_SIZE
    assert MODEL_SIZE == (processor.size["height"], processor.size["width"])


@pytest.mark.parametrize("height, width, multiple, expected", [
    (480, 640, 8, (480, 640)), (481, 643, 8, (480, 640)), (484, 645, 8, (488, 648)),
    (100, 150, 8, (104, 152)), (100, 150, 32, (96, 160)), (3, 5, 8, (8, 8)), (15, 17, 32, (32, 32))])
def test_target_size_native_rounds_to_nearest_multiple(height, width, multiple, expected):
    assert target_size("native", height, width, multiple) == expected


@pytest.mark.parametrize("height, width, multiple", [
    (2160, 3840, 32), (2160, 3840, 8), (8192, 8192, 32), (1088, 1921, 32), (100, 40000, 8)])
def test_target_size_native_is_capped_with_the_aspect_kept(height, width, multiple):
    out_h, out_w = target_size("native", height, width, multiple)
    assert out_h * out_w <= MAX_NATIVE_PIXELS and out_h % multiple == out_w % multiple == 0
    assert abs(out_w / out_h - width / height) <= (width / height) * 2 * multiple / min(out_h, out_w) + 0.05
    assert out_h * out_w > MAX_NATIVE_PIXELS * 0.8 or min(out_h, out_w) == multiple


def test_target_size_native_at_the_cap_is_unchanged():
    assert target_size("native", 1088, 1920, 32) == (1088, 1920)


def test_target_size_rejects_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        target_size("square", 480, 640, 8)


# --- resize and grayscale: bit-exact with the processor --------------------------------

@pytest.mark.parametrize("source, size", [
    ((600, 800), (480, 640)),  # torch's uint8 antialias interpolate is off by up to 2 here
    ((481, 641), (480, 640)), ((720, 1280), (480, 640)), ((120, 160), (480, 640)),
    ((37, 53), (480, 640)), ((375, 500), (104, 152)), ((480, 640), (96, 128))])
def test_resize_like_pil_is_exact(source, size):
    image = random_image(source + (3,), seed=sum(source))
    expected = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
    ours = resize_like_pil(torch.from_numpy(image).permute(2, 0, 1), size).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, expected)


# Portrait, square, landscape, odd and extreme aspect ratios, up and down (source (H, W)):
# Pillow runs the vertical pass first for some of them (issue 13), e.g. every portrait
# source resized to a landscape 640x480.
EVERY_SHAPE = [(640, 480), (1280, 720), (1920, 1080), (1024, 768), (800, 600), (1296, 968),
               (1200, 900), (960, 720), (1241, 376), (512, 512), (768, 1024), (4000, 3000),
               (3000, 4000), (240, 320), (480, 480), (100, 100), (900, 200), (7, 1500),
               (1500, 7), (481, 641), (479, 639), (33, 47), (2, 3), (1, 1)]
EVERY_TARGET = [(480, 640), (640, 480), (104, 152), (96, 96)]


@pytest.mark.parametrize("source", EVERY_SHAPE)
@pytest.mark.parametrize("size", EVERY_TARGET)
def test_resize_like_pil_is_exact_for_every_shape(source, size):
    image = random_image(source + (3,), seed=source[0] * 7 + source[1])
    expected = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
    ours = resize_like_pil(torch.from_numpy(image).permute(2, 0, 1), size).permute(1, 2, 0).numpy()
    differ = int((ours != expected).sum())
    assert differ == 0, f"{source} -> {size}: {differ} values differ from PIL"


@pytest.mark.parametrize("shape", [(1024, 768, 3), (640, 480, 3), (512, 512, 3), (376, 1241, 3),
                                   (1500, 7, 3), (768, 1024)])
def test_preprocess_gray_is_bit_exact_for_portrait_and_square(processor, shape):
    image = random_image(shape, seed=shape[0])
    assert torch.equal(preprocess_gray(image, MODEL_SIZE, CPU), reference_pixels(processor, image))


def test_rescale_and_gray_weights_round_like_numpy():
    """The claim preprocess_gray relies on, for every uint8 value: torch float32(u / 255)
    == numpy float32(float64(u) * (1/255)), and each float32 weighted term is identical."""
    values = torch.arange(256, dtype=torch.uint8)
    ours = values.float() / 255.0
    theirs = (np.arange(256).astype(np.float64) * (1 / 255)).astype(np.float32)
    np.testing.assert_array_equal(ours.numpy(), theirs)
    for weight in (0.2989, 0.5870, 0.1140):
        np.testing.assert_array_equal((ours * weight).numpy(), theirs * weight)


@pytest.mark.parametrize("shape", [(480, 640, 3), (120, 160, 3), (600, 800, 3), (120, 160), (480, 640)])
def test_preprocess_gray_is_bit_exact(processor, shape):
    image = random_image(shape, seed=len(shape))
    ours = preprocess_gray(image, MODEL_SIZE, CPU)
    assert ours.shape == (1, 1) + MODEL_SIZE and ours.dtype == torch.float32
    assert torch.equal(ours, reference_pixels(processor, image))


def test_preprocess_gray_on_real_frame_is_bit_exact(processor, tum_frames):
    image = tum_frames[0]
    assert torch.equal(preprocess_gray(image, MODEL_SIZE, CPU), reference_pixels(processor, image))
    assert torch.equal(preprocess_gray(image, (104, 152), CPU),
                       processor(image, size={"height": 104, "width": 152},
                                 return_tensors="pt")["pixel_values"][:, :1])


def test_already_gray_rgb_keeps_the_channel(processor):
    """The processor skips the formula when R == G == B, so the value is u/255, not
    0.9999 * u/255; matching that needs the same check (and mono input gives the same)."""
    mono = random_image((60, 80), seed=3)
    rgb = np.repeat(mono[:, :, None], 3, axis=2)
    ours = preprocess_gray(rgb, (60, 80), CPU)
    reference = processor(rgb, size={"height": 60, "width": 80}, return_tensors="pt")
    assert torch.equal(ours, reference["pixel_values"][:, :1])
    assert torch.equal(ours, preprocess_gray(mono, (60, 80), CPU))
    weighted = torch.from_numpy(mono).float() / 255 * (0.2989 + 0.5870 + 0.1140)
    assert not torch.equal(ours[0, 0], weighted)  # the formula would have changed it


def test_stock_processor_feeds_the_red_channel(stock_processor):
    """Without do_grayscale the model's input (channel 0) is R / 255: a texture only in
    G and B is invisible to the reference as shipped; our gray sees it."""
    image = np.zeros((480, 640, 3), np.uint8)
    image[..., 0] = 90
    image[..., 1:] = random_image((480, 640, 2), seed=4)
    stock = stock_processor(image, return_tensors="pt")["pixel_values"][:, :1]
    assert torch.equal(stock, torch.full_like(stock, np.float32(90 / 255)))
    ours = preprocess_gray(image, MODEL_SIZE, CPU)
    assert ours.std() > 0.05


# --- coordinates ------------------------------------------------------------------------

def reference_source_ints(model_xy: torch.Tensor, model_size, source_size) -> torch.Tensor:
    """The reference post-process: model (x, y) / [w, h] (model forward), * [W, H] and
    int32 (post_process_keypoint_detection), with those exact tensor types."""
    (height, width), (source_height, source_width) = model_size, source_size
    relative = model_xy.float() / torch.tensor([width, height])
    return (relative * torch.tensor([source_width, source_height])).to(torch.int32)


@pytest.mark.parametrize("source_size", [(480, 640), (600, 800), (123, 457), (1080, 1920),
                                         (968, 1296), (640, 480)])
def test_scale_to_source_is_pixel_centre_aligned(source_size):
    """x_src = (x_model + 0.5) * W / w - 0.5: model pixel centres land on the source
    positions they were resampled from (PIL's bilinear samples at (x + 0.5) * W / w - 0.5),
    not on the reference's x * W / w, which is off by 0.5 * (W / w - 1) px."""
    height, width = MODEL_SIZE
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    points = torch.stack([xs, ys], -1).reshape(-1, 2).float()
    ours = scale_to_source(points, MODEL_SIZE, source_size)
    assert ours.dtype == torch.float32
    scale = torch.tensor([source_size[1] / width, source_size[0] / height], dtype=torch.float64)
    torch.testing.assert_close(ours, ((points.double() + 0.5) * scale - 0.5).float(), rtol=0, atol=1e-4)
    # The image covers [-0.5, W - 0.5] in this convention; the first/last model pixel
    # centres sit half a model pixel inside it.
    first, last = ours[0], ours[-1]
    torch.testing.assert_close(first, (0.5 * scale - 0.5).float())
    torch.testing.assert_close(last, (torch.tensor(source_size[::-1]) - 0.5 - 0.5 * scale).float())
    # The reference's mapping differs by exactly the bias the issue measured.
    reference = points / torch.tensor([width, height]) * torch.tensor(source_size[::-1])
    torch.testing.assert_close(ours - reference, (0.5 * (scale - 1)).float().expand_as(ours),
                               rtol=0, atol=1e-3)


def test_scale_to_source_at_identity_keeps_values_exact():
    """254 stays 254.0, not 253.99998 (float32 divide-then-multiply)."""
    points = torch.tensor([[254.0, 17.0], [639.0, 479.0], [0.0, 0.0], [10.25, 3.5]])
    assert torch.equal(scale_to_source(points, MODEL_SIZE, MODEL_SIZE), points)
    assert torch.equal(scale_to_model(points, MODEL_SIZE, MODEL_SIZE), points)
    every = torch.stack(torch.meshgrid(torch.arange(640.0), torch.arange(480.0), indexing="ij"), -1).reshape(-1, 2)
    assert torch.equal(scale_to_source(every, MODEL_SIZE, MODEL_SIZE), every)
    # Exact multiples stay exact too: 2x down maps model pixel 3 to source 6.5 exactly.
    assert torch.equal(scale_to_source(torch.tensor([[3.0, 3.0]]), (240, 320), MODEL_SIZE),
                       torch.tensor([[6.5, 6.5]]))


def test_scale_to_model_inverts_scale_to_source():
    points = torch.tensor([[0.0, 0.0], [10.5, 7.25], [639.0, 479.0]])
    there = scale_to_source(points, MODEL_SIZE, (600, 800))
    torch.testing.assert_close(there, (points + 0.5) * 1.25 - 0.5)
    torch.testing.assert_close(scale_to_model(there, MODEL_SIZE, (600, 800)), points)


def test_gray_and_coordinate_mapping_need_no_synchronisation(monkeypatch):
    """What runs on the device per frame (the CUDA branch of the gray conversion, the
    coordinate mapping once its size constants are cached) reads no tensor value back."""
    from sync_counting import SyncCounter
    from kp_ros.core.preprocess import _gray_elementwise
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 48, 64), np.uint8))
    points = torch.rand(50, 2) * 60
    expected = scale_to_source(points, (48, 64), (480, 640))
    counter = SyncCounter(monkeypatch)
    gray = _gray_elementwise(pixels)
    mapped = scale_to_source(points, (48, 64), (480, 640))
    monkeypatch.undo()
    assert counter.calls == {}, counter.calls
    assert gray.shape == (48, 64) and torch.equal(mapped, expected)
