"""Raw image buffers (as in sensor_msgs/Image and CompressedImage) <-> numpy arrays.

Pure and ROS-free so the nodes and the bag tools decode frames identically. Models
take uint8 mono (HxW) or RGB (HxWx3); everything else is converted here or rejected
with an ``ImageDecodeError`` that says why.
"""
from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image as PILImage


class ImageDecodeError(ValueError):
    """A frame that cannot be turned into a model input; the message says why."""


# The sensor_msgs/image_encodings this package accepts: (dtype, channels).
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "mono8": (np.dtype(np.uint8), 1), "8UC1": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1), "16UC1": (np.dtype(np.uint16), 1),
    "rgb8": (np.dtype(np.uint8), 3), "bgr8": (np.dtype(np.uint8), 3), "8UC3": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4), "bgra8": (np.dtype(np.uint8), 4), "8UC4": (np.dtype(np.uint8), 4),
    "rgb16": (np.dtype(np.uint16), 3), "bgr16": (np.dtype(np.uint16), 3),
    "rgba16": (np.dtype(np.uint16), 4), "bgra16": (np.dtype(np.uint16), 4),
}
# Channel order of 3/4-channel encodings; the OpenCV-style nUCm ones are BGR(A) by convention.
_BGR_ORDER = {"bgr8", "8UC3", "bgra8", "8UC4", "bgr16", "bgra16"}
MAX_PIXELS = 8192 * 8192  # a sanity bound: larger "frames" are corrupt headers, not images


def image_from_buffer(data, height: int, width: int, encoding: str, step: int,
                      is_bigendian: bool = False) -> np.ndarray:
    """A zero-copy HxW or HxWxC view of a raw image buffer that honours row padding.

    ``data`` is any buffer (bytes, array.array, memoryview, numpy). Raises
    ImageDecodeError for unknown encodings, zero or absurd sizes, a step smaller than
    one row, or data shorter than step*height (longer is tolerated: trailing bytes
    are ignored, as ROS image consumers do).
    """
    if encoding not in ENCODINGS:
        raise ImageDecodeError(
            f"unsupported encoding {encoding!r}; supported: {', '.join(sorted(ENCODINGS))}")
    dtype, channels = ENCODINGS[encoding]
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"empty image: {width}x{height}")
    if height * width > MAX_PIXELS:
        raise ImageDecodeError(f"image {width}x{height} exceeds {MAX_PIXELS} pixels")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageDecodeError(
            f"step {step} < width*channels*bytes = {row_bytes} for {encoding} {width}x{height}")
    if step % dtype.itemsize:
        raise ImageDecodeError(f"step {step} is not a multiple of the {dtype.itemsize}-byte pixel element")
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size < step * height:
        raise ImageDecodeError(
            f"data has {buffer.size} bytes, expected step*height = {step}*{height} = {step * height}")
    rows = buffer[:step * height].reshape(height, step)[:, :row_bytes]
    image = rows.view(dtype.newbyteorder(">" if is_bigendian else "<"))
    image = image.reshape((height, width, channels) if channels > 1 else (height, width))
    return image


def to_model_input(image: np.ndarray, encoding: str) -> np.ndarray:
    """uint8 mono (HxW) or RGB (HxWx3), contiguous, from a decoded image of ``encoding``."""
    if image.dtype != np.uint8:
        # 16-bit: keep the most significant byte (full-range 16-bit cameras).
        image = (image.astype(np.uint16) >> 8).astype(np.uint8)
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if encoding in _BGR_ORDER:
        # OpenCV swaps channels ~5x faster than a numpy [..., ::-1] copy.
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


def check_compressed(data) -> np.ndarray:
    """The bytes as a uint8 array, after the checks that need no decoding (empty data, a
    header that claims too many pixels); ImageDecodeError otherwise. Tens of microseconds."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size == 0:
        raise ImageDecodeError("empty compressed image")
    width, height = _compressed_size(data)
    if width * height > MAX_PIXELS:
        # A few KB of PNG can claim gigapixels: refuse before decoding, as for raw frames.
        raise ImageDecodeError(f"compressed image {width}x{height} exceeds {MAX_PIXELS} pixels")
    return buffer


def decode_compressed(data) -> np.ndarray:
    """uint8 mono or RGB from JPEG/PNG/... bytes (sensor_msgs/CompressedImage.data)."""
    buffer = check_compressed(data)
    image = cv2.imdecode(buffer, cv2.IMREAD_ANYCOLOR)
    if image is None:
        raise ImageDecodeError(f"undecodable compressed image ({buffer.size} bytes)")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def _compressed_size(data) -> tuple[int, int]:
    """(width, height) from the header alone (Pillow reads no pixels to open); (0, 0)
    for formats Pillow does not know, which OpenCV then decodes or rejects."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as header:  # any bytes-like, one copy
                return header.size
    except (PILImage.DecompressionBombWarning, PILImage.DecompressionBombError):
        return MAX_PIXELS + 1, 1
    except Exception:  # noqa: BLE001 - unknown or broken header: leave it to OpenCV
        return 0, 0


def model_input_encoding(image: np.ndarray) -> str:
    """The encoding to publish a uint8 mono or RGB array with."""
    return "mono8" if image.ndim == 2 else "rgb8"
