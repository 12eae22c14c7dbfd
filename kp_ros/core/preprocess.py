"""Image -> model tensor, in torch on the model's device, matching the reference processors.

The reference (SuperPoint/EfficientLoFTR ``*ImageProcessorPil``) does, per image:
  1. PIL ``Image.resize(BILINEAR)`` on the uint8 image (skipped by PIL when the size is equal),
  2. ``rescale``: ``float32(float64(u8) * (1/255))``,
  3. ``convert_to_grayscale`` (only with ``do_grayscale``): ``r*0.2989 + g*0.5870 + b*0.1140``
     in float32, *unless* the three channels are already equal, in which case the channel
     itself is kept (note 0.2989+0.5870+0.1140 = 0.9999, so this matters for exactness).
``preprocess_gray`` reproduces all three bit-exactly: PIL's fixed-point resampler is
re-implemented in integer torch ops (torch's own uint8 antialias interpolate differs from
PIL by up to 2 levels at some sizes, e.g. 800x600 -> 640x480), and steps 2-3 use
the same float32 roundings as the reference's numpy arithmetic.

Coordinates: pixel centres at integers in both the model and the source image, so
``scale_to_source`` is ``(k + 0.5) * W / w - 0.5``. The reference post-process uses
``int((k / [w, h]) * [W, H])`` instead, biased by ``0.5 * (W / w - 1)`` px;
parity tests apply that formula to kp_ros's model-resolution keypoints to compare.
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import torch

from kp_ros.core.device_placement import to_device
from kp_ros.core.params import RESIZE_CHOICES

MODEL_SIZE = (480, 640)  # (height, width) of the reference processors' resize
RESIZE_POLICIES = RESIZE_CHOICES
# 'native' caps the model input here (aspect kept): a 4K or corrupt-but-plausible frame
# would otherwise need tens of GB in EfficientLoFTR; 1920x1088 fits a consumer GPU.
MAX_NATIVE_PIXELS = 1920 * 1088

_PRECISION_BITS = 32 - 8 - 2  # PIL Resample.c, 8 bits per channel
_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # the processors' NTSC weights (R, G, B)


def image_to_tensor(image: np.ndarray, device) -> torch.Tensor:
    """uint8 HxW or HxWx{1,3} (RGB) -> float32 (1, C, H, W) on ``device``, values 0..255."""
    return _uint8_to_device(image, device).float()


def target_size(policy: str, height: int, width: int, multiple: int) -> tuple[int, int]:
    """The (height, width) the model runs at.

    'model': the reference processors' fixed (480, 640). 'native': the source size rounded
    to the nearest multiple of ``multiple`` (8 for SuperPoint, 32 for EfficientLoFTR),
    at least ``multiple``; a source larger than MAX_NATIVE_PIXELS is first scaled down to
    that many pixels, aspect kept (coordinates still come back in source pixels).
    """
    if policy == "model":
        return MODEL_SIZE
    if policy == "native":
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        scale = min(1.0, float(np.sqrt(MAX_NATIVE_PIXELS / max(1, height * width))))
        return tuple(max(multiple, int(np.floor(s * scale / multiple)) * multiple) if scale < 1
                     else max(multiple, int(np.floor(s / multiple + 0.5)) * multiple)
                     for s in (height, width))
    raise ValueError(f"unknown resize policy {policy!r}: use one of {RESIZE_POLICIES}")


def preprocess_gray(image: np.ndarray, size: tuple[int, int], device) -> torch.Tensor:
    """uint8 HxW or HxWx3 (RGB) -> float32 (1, 1, h, w) in [0, 1] on ``device``.

    Bit-exact with the reference processor (``do_grayscale=True``): PIL bilinear resize of
    the uint8 image, then rescale, then grayscale.
    """
    pixels = _uint8_to_device(image, device)[0]  # (C, H, W) uint8
    pixels = resize_like_pil(pixels, size)
    if pixels.device.type == "cpu":
        return torch.from_numpy(_gray_by_lookup(np.ascontiguousarray(pixels.numpy())))[None, None]
    return _gray_elementwise(pixels)[None, None]


def _gray_elementwise(pixels: torch.Tensor) -> torch.Tensor:
    """(C, H, W) uint8 -> (H, W) float32, the reference's arithmetic as torch ops (on any device)."""
    # float32(u8 / 255) equals the reference's float32(float64(u8) * (1/255)) for all 256
    # values, and float32 * python-float rounds like numpy's float32 * weak scalar
    # (both checked exhaustively in test_preprocess).
    rescaled = pixels.float().div_(255.0)
    if rescaled.shape[0] == 1:
        return rescaled[0]
    red, green, blue = rescaled
    gray = red * _GRAY_WEIGHTS[0] + green * _GRAY_WEIGHTS[1] + blue * _GRAY_WEIGHTS[2]
    # The reference keeps an already-gray image as is (no 0.9999 factor); torch.where
    # instead of an `if` avoids a device sync.
    already_gray = (pixels[0] == pixels[1]).all() & (pixels[1] == pixels[2]).all()
    return torch.where(already_gray, red, gray)


@lru_cache(maxsize=1)
def _gray_tables() -> np.ndarray:
    """(4, 256) float32: u8 -> u8 / 255, and that times each NTSC weight, computed by the
    very torch ops of ``_gray_elementwise`` (so every entry is bit-identical to them)."""
    rescaled = torch.arange(256, dtype=torch.uint8).float().div_(255.0)
    return torch.stack([rescaled] + [rescaled * w for w in _GRAY_WEIGHTS]).numpy()


def _gray_by_lookup(planes: np.ndarray) -> np.ndarray:
    """``_gray_elementwise`` on CPU as table lookups (cv2.LUT) and two float32 additions in
    the same order: ~2x faster, bit-identical (test_preprocess checks every pixel value)."""
    tables = _gray_tables()
    already_gray = planes.shape[0] == 1 or (np.array_equal(planes[0], planes[1])
                                            and np.array_equal(planes[1], planes[2]))
    if already_gray:
        return cv2.LUT(planes[0], tables[0])  # kept as is (no weights), as the reference does
    gray = cv2.LUT(planes[0], tables[1])
    gray += cv2.LUT(planes[1], tables[2])
    gray += cv2.LUT(planes[2], tables[3])
    return gray


def resize_like_pil(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) uint8 -> (C, h, w) uint8, exactly PIL ``Image.resize(size, BILINEAR)``.

    PIL resamples separably, each pass in 22-bit fixed point with a uint8 result; the same
    integer arithmetic runs here as gather + multiply-add, in PIL's pass order (the
    rounding between the passes makes the order matter: see ``pil_vertical_pass_first``).
    """
    height, width = size
    in_height, in_width = pixels.shape[-2:]
    if (in_height, in_width) == (height, width):
        return pixels  # PIL returns a copy: nothing is resampled
    out = pixels.to(torch.int32)
    if pil_vertical_pass_first((in_height, in_width), size):
        out = _resample_last_axis(out.transpose(-1, -2), height).transpose(-1, -2)
        out = _resample_last_axis(out, width)
    else:
        if in_width != width:
            out = _resample_last_axis(out, width)
        if in_height != height:
            out = _resample_last_axis(out.transpose(-1, -2), height).transpose(-1, -2)
    return out.to(torch.uint8)


def pil_vertical_pass_first(source_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether Pillow (13, the pinned version) resamples rows before columns.

    Its ``ImagingResample`` (no Python-visible switch; read from the compiled library and
    checked against ``Image.resize`` on every shape in test_preprocess) runs the vertical
    pass first when both axes change and the height shrinks by more than twice the width's
    shrink: e.g. every portrait source resized to 640x480, and 512x512.
    """
    (in_height, in_width), (height, width) = source_size, size
    if in_height == height or in_width == width or in_height <= height:
        return False
    return in_height - height > 2 * (in_width - width)


def scale_to_source(points_xy: torch.Tensor, model_size: tuple[int, int],
                    source_size: tuple[int, int]) -> torch.Tensor:
    """Model-resolution (x, y) -> source pixels, float32, pixel centres at integers in both:
    ``x_src = (x_model + 0.5) * W / w - 0.5`` (per axis), the inverse of where the resize
    sampled model pixel x from. The image spans [-0.5, W - 0.5] in this convention."""
    return _centre_aligned(points_xy, model_size, source_size)


def scale_to_model(points_xy: torch.Tensor, model_size: tuple[int, int],
                   source_size: tuple[int, int]) -> torch.Tensor:
    """Source pixels (x, y) -> model resolution, float32 (the inverse of scale_to_source)."""
    return _centre_aligned(points_xy, source_size, model_size)


def _centre_aligned(points_xy: torch.Tensor, from_size, to_size) -> torch.Tensor:
    # As ((2x + 1) * W - w) / (2w) in float64: the numerator is exact for any float32 x, so
    # the one division is the only rounding; identity and exact ratios stay exact
    # (254 -> 254.0, not 253.99998 as float32 x / w * W gives).
    (h, w), (H, W) = from_size, to_size
    points = points_xy.to(torch.float64)
    if (h, w) == (H, W):
        return points.float()
    sizes_from, sizes_to = _size_constants((w, h), (W, H), points.device)
    return (((2 * points + 1) * sizes_to - sizes_from) / (2 * sizes_from)).float()


@lru_cache(maxsize=64)
def _size_constants(sizes_from: tuple, sizes_to: tuple, device: torch.device):
    """The (x, y) sizes as float64 tensors on ``device``, uploaded once per size pair: a
    per-frame ``new_tensor`` is a blocking host-to-device copy (a synchronisation) on
    CUDA. Tensors, not python-scalar divisors: CUDA divides by a scalar as a multiply by
    its reciprocal, which would break the exactness above."""
    return (torch.tensor(sizes_from, dtype=torch.float64, device=device),
            torch.tensor(sizes_to, dtype=torch.float64, device=device))


def _uint8_to_device(image: np.ndarray, device) -> torch.Tensor:
    """HxW / HxWx1 / HxWx3 uint8 -> (1, C, H, W) uint8 on ``device`` (uint8 moves 4x fewer bytes)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {image.shape}")
    if not image.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only memory
        image = image.copy()
    # On CUDA through pinned memory, asynchronously (a pageable copy would block the host
    # until the device caught up: a synchronisation per frame); see device_placement.
    tensor = to_device(torch.from_numpy(np.ascontiguousarray(image)), device)
    return tensor.permute(2, 0, 1).contiguous()[None]  # planar: later per-channel ops run contiguous


def _resample_last_axis(pixels: torch.Tensor, out_size: int) -> torch.Tensor:
    index, weights = _pil_bilinear_coeffs_on(pixels.shape[-1], out_size, pixels.device)
    taps = pixels[..., index]  # (..., out_size, ksize)
    acc = (taps * weights).sum(-1, dtype=torch.int32) + (1 << (_PRECISION_BITS - 1))
    return (acc >> _PRECISION_BITS).clamp_(0, 255)


@lru_cache(maxsize=32)
def _pil_bilinear_coeffs_on(in_size: int, out_size: int, device: torch.device):
    """``_pil_bilinear_coeffs`` as tensors on ``device``, cached: no upload per frame."""
    return tuple(torch.from_numpy(array).to(device) for array in _pil_bilinear_coeffs(in_size, out_size))


def _pil_bilinear_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for the bilinear filter:
    per output pixel, the input indices and int32 fixed-point weights (zero-padded)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    inv_filterscale = 1.0 / filterscale
    support = 1.0 * filterscale  # bilinear support is 1
    ksize = int(np.ceil(support)) * 2 + 1
    index = np.zeros((out_size, ksize), np.int64)
    weights = np.zeros((out_size, ksize), np.int32)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        # Same double arithmetic as PIL (multiply by 1/filterscale, sequential sum).
        taps = [max(0.0, 1.0 - abs((x + xmin - center + 0.5) * inv_filterscale))
                for x in range(xmax)]
        total = 0.0
        for tap in taps:
            total += tap
        taps = np.array(taps) / total if total != 0.0 else np.array(taps)
        fixed = np.where(taps < 0, -0.5 + taps * (1 << _PRECISION_BITS),
                         0.5 + taps * (1 << _PRECISION_BITS))
        weights[xx, :xmax] = fixed.astype(np.int32)  # C (int) cast truncates toward zero
        index[xx, :xmax] = np.arange(xmin, xmin + xmax)
        index[xx, xmax:] = xmin
    return index, weights
