"""The bad-input corpus at the conversion layer, and fuzz/property tests of what the
round trips in test_conversions.py leave out (Matches, CompressedImage, array views,
byte order, arbitrary headers and bytes).

``RAW_CORPUS`` and ``COMPRESSED_CORPUS`` are shared with test_robustness_nodes.py, which
feeds the same messages to both nodes over DDS. Every case says what must happen: the
frame is decoded to a model input of a given shape, or rejected with an ImageDecodeError
whose message matches ``reason``. Nothing else (no other exception, no crash).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from kp_ros.core.image_codec import ENCODINGS, MAX_PIXELS, ImageDecodeError
from kp_ros.ros.conversions import (array_to_image_msg, image_msg_to_array, image_msg_to_model_input,
                                    matches_from_msg, matches_to_msg)


@dataclass(frozen=True)
class Case:
    """One corpus input: ``build()`` makes a fresh message; ``reason`` (a regex) when it
    must be rejected, else ``shape`` is the model input's shape."""
    name: str
    build: Callable[[], object]
    reason: str | None = None
    shape: tuple[int, ...] | None = None
    big: bool = False  # costly over DDS: sent once per node

    @property
    def accepted(self) -> bool:
        return self.reason is None


def raw(height, width, encoding, step=None, data=None, pixels=None, bigendian=False) -> Callable[[], Image]:
    """A builder of a raw Image; by default packed rows of a deterministic pattern."""
    def build():
        if data is not None:
            payload, row = data, step
        else:
            dtype, channels = ENCODINGS.get(encoding, (np.dtype(np.uint8), 1))
            shape = (height, width, channels) if channels > 1 else (height, width)
            image = pixels(shape, dtype) if pixels else (
                np.arange(np.prod(shape)).reshape(shape) * 37 % np.iinfo(dtype).max).astype(dtype)
            image = image.astype(image.dtype.newbyteorder(">" if bigendian else "<"))
            payload = image.tobytes()
            row = step if step is not None else width * channels * dtype.itemsize
            if row > width * channels * dtype.itemsize:  # pad rows with junk
                rows = np.frombuffer(payload, np.uint8).reshape(height, -1)
                junk = np.full((height, row - rows.shape[1]), 0xEE, np.uint8)
                payload = np.concatenate([rows, junk], 1).tobytes()
        return Image(height=height, width=width, encoding=encoding, step=row,
                     is_bigendian=bigendian, data=payload)
    return build


def const(value):
    return lambda shape, dtype: np.full(shape, value, dtype)


def _jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image)[1].tobytes()


def compressed(payload_fn: Callable[[], bytes], fmt: str = "jpeg") -> Callable[[], CompressedImage]:
    return lambda: CompressedImage(format=fmt, data=payload_fn())


def _texture(height, width, channels=3, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), channels), np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return image if channels > 1 else image.reshape(height, width)


RAW_CORPUS = [
    # encodings
    Case("unknown encoding yuv422", raw(4, 4, "yuv422", step=8, data=bytes(32)), r"unsupported encoding 'yuv422'"),
    Case("bayer encoding", raw(4, 4, "bayer_rggb8", step=4, data=bytes(16)), r"unsupported encoding 'bayer_rggb8'"),
    Case("empty encoding", raw(4, 4, "", step=4, data=bytes(16)), r"unsupported encoding ''"),
    Case("float 32FC1", raw(4, 4, "32FC1", step=16, data=np.full(16, 0.5, np.float32).tobytes()),
         r"unsupported encoding '32FC1'"),
    Case("float 64FC1", raw(3, 5, "64FC1", step=40, data=bytes(120)), r"unsupported encoding '64FC1'"),
    Case("16-bit mono16", raw(24, 32, "mono16"), shape=(24, 32)),
    Case("16-bit 16UC1 big-endian", raw(24, 32, "16UC1", bigendian=True), shape=(24, 32)),
    Case("16-bit rgb16 padded", raw(24, 32, "rgb16", step=32 * 6 + 10), shape=(24, 32, 3)),
    # sizes and buffers
    Case("zero width", raw(4, 0, "mono8", step=0, data=b""), r"empty image: 0x4"),
    Case("zero height", raw(0, 4, "rgb8", step=12, data=b""), r"empty image: 4x0"),
    Case("zero both", raw(0, 0, "mono8", step=0, data=b""), r"empty image"),
    Case("data shorter than step*height", raw(8, 8, "rgb8", step=24, data=bytes(24 * 8 - 1)),
         r"data has 191 bytes, expected step\*height"),
    Case("no data", raw(8, 8, "mono8", step=8, data=b""), r"data has 0 bytes"),
    Case("data longer than step*height", raw(16, 20, "mono8", step=20, data=bytes(range(256)) * 2),
         shape=(16, 20)),
    Case("step smaller than width*channels", raw(8, 8, "rgb8", step=20, data=bytes(160)), r"step 20 < "),
    Case("step zero", raw(8, 8, "mono8", step=0, data=bytes(64)), r"step 0 < "),
    Case("step not a multiple of the 16-bit element", raw(4, 4, "mono16", step=9, data=bytes(36)),
         r"not a multiple"),
    Case("absurd header 100000x100000", raw(100000, 100000, "mono8", step=100000, data=bytes(16)),
         r"exceeds"),
    Case("1x1 mono8", raw(1, 1, "mono8"), shape=(1, 1)),
    Case("1x1 rgb8", raw(1, 1, "rgb8"), shape=(1, 1, 3)),
    Case("7x13 bgra8 padded", raw(7, 13, "bgra8", step=13 * 4 + 3), shape=(7, 13, 3)),
    Case("2x500 strip", raw(2, 500, "mono8"), shape=(2, 500)),
    # content
    Case("all black", raw(120, 160, "rgb8", pixels=const(0)), shape=(120, 160, 3)),
    Case("all white", raw(120, 160, "mono8", pixels=const(255)), shape=(120, 160)),
    Case("4000x3000 rgb8", raw(3000, 4000, "rgb8", pixels=lambda s, d: _texture(*s[:2])),
         shape=(3000, 4000, 3), big=True),
]

_JPEG = _jpeg(_texture(64, 80))
COMPRESSED_CORPUS = [
    Case("empty", compressed(lambda: b""), r"empty compressed image"),
    Case("garbage bytes", compressed(lambda: bytes(range(256)) * 4), r"undecodable compressed image"),
    Case("JPEG header only", compressed(lambda: _JPEG[:200]), r"undecodable compressed image"),
    Case("JPEG cut in half", compressed(lambda: _JPEG[:len(_JPEG) // 2]), r"undecodable compressed image"),
    Case("PNG signature only", compressed(lambda: b"\x89PNG\r\n\x1a\n", "png"), r"undecodable"),
    Case("JPEG with trailing junk", compressed(lambda: _JPEG + b"junk" * 50), shape=(64, 80, 3)),
    Case("format says png, data is JPEG", compressed(lambda: _JPEG, "png"), shape=(64, 80, 3)),
    Case("1x1 JPEG", compressed(lambda: _jpeg(np.zeros((1, 1, 3), np.uint8))), shape=(1, 1, 3)),
    Case("PNG with alpha", compressed(lambda: cv2.imencode(".png", _texture(48, 64, 4))[1].tobytes(), "png"),
         shape=(48, 64, 3)),
    Case("16-bit gray PNG", compressed(lambda: cv2.imencode(
        ".png", _texture(48, 64, 1).astype(np.uint16) * 257)[1].tobytes(), "png"), shape=(48, 64)),
    Case("all white gray PNG", compressed(lambda: cv2.imencode(
        ".png", np.full((40, 56), 255, np.uint8))[1].tobytes(), "png"), shape=(40, 56)),
]


def check_model_input(image: np.ndarray, shape) -> None:
    assert image.dtype == np.uint8 and image.shape == shape and image.flags.c_contiguous


@pytest.mark.parametrize("case", RAW_CORPUS + COMPRESSED_CORPUS, ids=lambda c: c.name)
def test_corpus_decodes_or_is_rejected_with_a_reason(case):
    msg = case.build()
    if case.accepted:
        check_model_input(image_msg_to_model_input(msg), case.shape)
    else:
        with pytest.raises(ImageDecodeError, match=case.reason):
            image_msg_to_model_input(msg)


def test_16_bit_frames_keep_the_most_significant_byte_in_either_byte_order():
    values = np.array([[0, 255, 256, 0x1234, 0xFFFF]], np.uint16)
    for order in "<>":
        msg = array_to_image_msg(values.astype(values.dtype.newbyteorder(order)), "mono16")
        assert msg.is_bigendian == (order == ">")
        assert image_msg_to_model_input(msg).tolist() == [[0, 0, 1, 0x12, 0xFF]]


def test_compressed_frame_larger_than_max_pixels_is_rejected():
    side = int(np.sqrt(MAX_PIXELS)) + 8
    png = cv2.imencode(".png", np.zeros((side, side), np.uint8))[1].tobytes()
    assert len(png) < MAX_PIXELS // 100  # tiny on the wire
    with pytest.raises(ImageDecodeError, match="exceeds|too large|undecodable"):
        image_msg_to_model_input(CompressedImage(format="png", data=png))


def test_compressed_size_comes_from_the_header_alone():
    """The bound needs no decode: the first bytes of a file already give its size."""
    from kp_ros.core.image_codec import _compressed_size
    image = np.zeros((480, 640, 3), np.uint8)
    for ext in (".png", ".jpg"):
        encoded = cv2.imencode(ext, image)[1].tobytes()
        assert _compressed_size(encoded[:1024]) == (640, 480), ext
    assert _compressed_size(b"not an image") == (0, 0)  # left to OpenCV, which rejects it


# --- fuzz: any header and any bytes decode or raise ImageDecodeError, nothing else ------------

ENCODING_NAMES = sorted(ENCODINGS) + ["32FC1", "yuv422", "", "mono8 ", "RGB8"]


@settings(max_examples=300, deadline=None)
@given(height=st.integers(0, 40), width=st.integers(0, 40), step=st.integers(0, 200),
       encoding=st.sampled_from(ENCODING_NAMES), size=st.integers(0, 9000), bigendian=st.booleans())
def test_fuzz_any_image_header_decodes_consistently_or_is_rejected(height, width, step, encoding,
                                                                   size, bigendian):
    data = (bytes(range(251)) * (size // 251 + 1))[:size]
    msg = Image(height=height, width=width, encoding=encoding, step=step, is_bigendian=bigendian, data=data)
    try:
        view = image_msg_to_array(msg)
    except ImageDecodeError as exc:
        assert str(exc)
        return
    dtype, channels = ENCODINGS[encoding]
    assert view.shape == ((height, width) if channels == 1 else (height, width, channels))
    row_bytes = width * channels * dtype.itemsize
    expected = np.frombuffer(data, np.uint8)[:step * height].reshape(height, step)[:, :row_bytes]
    assert np.ascontiguousarray(view).view(np.uint8).reshape(height, row_bytes).tobytes() == expected.tobytes()
    model_input = image_msg_to_model_input(msg)
    assert model_input.dtype == np.uint8 and model_input.shape[:2] == (height, width)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), cut=st.integers(0, 100), flips=st.integers(0, 8),
       fmt=st.sampled_from([".png", ".jpg", ".bmp"]))
def test_fuzz_damaged_compressed_bytes_decode_or_are_rejected(seed, cut, flips, fmt):
    """Valid files, truncated and with flipped bytes: an image or ImageDecodeError."""
    rng = np.random.default_rng(seed)
    payload = bytearray(cv2.imencode(fmt, _texture(24, 32, 3, seed))[1].tobytes())
    for position in rng.integers(0, len(payload), flips):
        payload[position] ^= 0xFF
    payload = bytes(payload[:len(payload) * cut // 100])
    try:
        image = image_msg_to_model_input(CompressedImage(format=fmt[1:], data=payload))
    except ImageDecodeError as exc:
        assert "compressed image" in str(exc)
        return
    assert image.dtype == np.uint8 and image.ndim in (2, 3) and min(image.shape[:2]) >= 1
    assert image.ndim == 2 or image.shape[2] == 3


# --- round-trip properties --------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 40), width=st.integers(1, 40), color=st.booleans(), seed=st.integers(0, 2**16))
def test_property_lossless_compressed_round_trip(height, width, color, seed):
    shape = (height, width, 3) if color else (height, width)
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    bgr = image[:, :, ::-1] if color else image  # OpenCV writes BGR; the node returns RGB
    png = cv2.imencode(".png", np.ascontiguousarray(bgr))[1].tobytes()
    back = image_msg_to_model_input(CompressedImage(format="png", data=png))
    assert back.dtype == np.uint8 and np.array_equal(back, image)


@settings(max_examples=20, deadline=None)
@given(height=st.integers(8, 40), width=st.integers(8, 40), seed=st.integers(0, 2**16))
def test_property_jpeg_round_trip_keeps_size_channels_and_colour_order(height, width, seed):
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = 200 + seed % 50  # strongly red in RGB: a BGR/RGB swap would show
    jpeg = _jpeg(np.ascontiguousarray(image[:, :, ::-1]))
    back = image_msg_to_model_input(CompressedImage(format="jpeg", data=jpeg))
    assert back.shape == image.shape
    assert back[..., 0].mean() > 150 and back[..., 2].mean() < 60


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 20), width=st.integers(1, 20), channels=st.sampled_from([1, 3, 4]),
       wide=st.booleans(), view=st.sampled_from(["flip_x", "flip_y", "crop", "step2", "same"]),
       bigendian=st.booleans(), seed=st.integers(0, 2**16))
def test_property_array_views_and_byte_orders_round_trip(height, width, channels, wide, view,
                                                         bigendian, seed):
    """Non-contiguous numpy views (flipped, cropped, strided) and big-endian arrays pack
    into a valid Image that reads back equal."""
    dtype = np.dtype(np.uint16 if wide else np.uint8)
    shape = (2 * height, 2 * width) + ((channels,) if channels > 1 else ())
    base = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    if bigendian:
        base = base.astype(dtype.newbyteorder(">"))
    image = {"flip_x": base[:, ::-1], "flip_y": base[::-1], "crop": base[1:height + 1, 1:width + 1],
             "step2": base[::2, ::2], "same": base}[view]
    encoding = {(1, False): "mono8", (3, False): "rgb8", (4, False): "rgba8",
                (1, True): "mono16", (3, True): "rgb16", (4, True): "rgba16"}[channels, wide]
    msg = array_to_image_msg(image, encoding)
    assert msg.step == image.shape[1] * max(channels, 1) * dtype.itemsize
    assert len(msg.data) == msg.step * msg.height
    assert np.array_equal(image_msg_to_array(msg), image)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), with_inliers=st.booleans(), seed=st.integers(0, 2**16),
       sec=st.integers(0, 2**31 - 1), nanosec=st.integers(0, 999_999_999),
       frame_id=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
       height=st.integers(1, 10000), width=st.integers(1, 10000))
def test_property_matches_round_trip(n, with_inliers, seed, sec, nanosec, frame_id, height, width):
    rng = np.random.default_rng(seed)
    k0 = (rng.random((n, 2)) * [width, height]).astype(np.float32)
    k1 = (rng.random((n, 2)) * [width, height]).astype(np.float32)
    scores = rng.random(n).astype(np.float32)
    inliers = rng.integers(0, 2, n).astype(np.uint8) if with_inliers else None
    header = Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id=frame_id + "_1")
    stamp0 = Time(sec=max(sec - 1, 0), nanosec=nanosec)
    msg = matches_to_msg(header, stamp0, frame_id, height, width, "m", k0, k1, scores, inliers)
    assert msg.header == header and msg.stamp0 == stamp0 and msg.frame_id0 == frame_id
    assert (msg.height, msg.width) == (height, width)
    back = matches_from_msg(msg)
    assert back["keypoints0"].shape == back["keypoints1"].shape == (n, 2)
    assert back["keypoints0"].tobytes() == k0.tobytes() and back["keypoints1"].tobytes() == k1.tobytes()
    assert back["scores"].tobytes() == scores.tobytes()
    assert back["inliers"].tolist() == (inliers.tolist() if with_inliers else [])


@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 50), seed=st.integers(0, 2**16))
def test_property_matches_from_tensors_equal_matches_from_arrays(n, seed):
    """The node passes CPU tensors straight from the core: same message as numpy arrays."""
    import torch
    rng = np.random.default_rng(seed)
    k0, k1 = rng.random((n, 2)).astype(np.float32), rng.random((n, 2)).astype(np.float32)
    scores, inliers = rng.random(n).astype(np.float32), rng.integers(0, 2, n).astype(np.uint8)
    header = Header(frame_id="c")
    from_numpy = matches_to_msg(header, Time(), "p", 4, 4, "m", k0, k1, scores, inliers)
    from_torch = matches_to_msg(header, Time(), "p", 4, 4, "m", *map(torch.from_numpy, (k0, k1, scores, inliers)))
    assert from_numpy == from_torch
