"""numpy <-> kp_ros / sensor_msgs messages, through bytes and array.array.

Filling a float32[] field from a numpy array element by element costs 30-50 ms for a
2000x256 descriptor block; going through ``array.array.frombytes`` costs ~2 ms, and
reading back with ``np.frombuffer`` is zero-copy.
"""
from __future__ import annotations

import array

import numpy as np
from sensor_msgs.msg import CompressedImage, Image

from kp_ros.core.image_codec import (ImageDecodeError, check_compressed, decode_compressed,
                                     image_from_buffer, model_input_encoding, to_model_input)
from kp_ros.msg import Keypoints, Matches


def _f32(values) -> array.array:
    out = array.array("f")
    out.frombytes(np.ascontiguousarray(np.asarray(values, dtype=np.float32)).tobytes())
    return out


def _u8(values) -> array.array:
    out = array.array("B")
    out.frombytes(np.ascontiguousarray(np.asarray(values, dtype=np.uint8)).tobytes())
    return out


def _as_numpy(values):
    return values.numpy() if hasattr(values, "numpy") else np.asarray(values)


def keypoints_to_msg(header, height: int, width: int, detector: str, keypoints_xy,
                     scores, descriptors=None) -> Keypoints:
    """Keypoints message from (N,2) x,y, (N,) scores and optional (N,D) descriptors
    (numpy arrays or CPU tensors)."""
    keypoints_xy = _as_numpy(keypoints_xy).reshape(-1, 2)
    msg = Keypoints(header=header, height=int(height), width=int(width), detector=detector)
    msg.x = _f32(keypoints_xy[:, 0])
    msg.y = _f32(keypoints_xy[:, 1])
    msg.scores = _f32(_as_numpy(scores))
    if descriptors is not None:
        descriptors = _as_numpy(descriptors)
        if descriptors.ndim != 2:  # a flat block: D follows from N (N = 0 gives D = 0)
            descriptors = descriptors.reshape(len(keypoints_xy), -1) if len(keypoints_xy) else \
                descriptors.reshape(0, 0)
        msg.descriptor_size = descriptors.shape[1]
        msg.descriptors = _f32(descriptors.ravel())
    return msg


def keypoints_from_msg(msg: Keypoints) -> dict[str, np.ndarray]:
    """Zero-copy float32 views: keypoints (N,2) x,y, scores (N,), descriptors (N,D)."""
    x = np.frombuffer(msg.x, dtype=np.float32)
    y = np.frombuffer(msg.y, dtype=np.float32)
    size = msg.descriptor_size
    descriptors = np.frombuffer(msg.descriptors, dtype=np.float32)
    return {
        "keypoints": np.stack([x, y], axis=1),
        "scores": np.frombuffer(msg.scores, dtype=np.float32),
        "descriptors": descriptors.reshape(-1, size) if size else descriptors.reshape(len(x), 0),
    }


def matches_to_msg(header, stamp0, frame_id0: str, height: int, width: int, matcher: str,
                   keypoints0, keypoints1, scores, inliers=None) -> Matches:
    """Matches message: header of the newer frame, stamp0/frame_id0 of the older one."""
    keypoints0 = _as_numpy(keypoints0).reshape(-1, 2)
    keypoints1 = _as_numpy(keypoints1).reshape(-1, 2)
    msg = Matches(header=header, stamp0=stamp0, frame_id0=frame_id0, height=int(height),
                  width=int(width), matcher=matcher)
    msg.x0, msg.y0 = _f32(keypoints0[:, 0]), _f32(keypoints0[:, 1])
    msg.x1, msg.y1 = _f32(keypoints1[:, 0]), _f32(keypoints1[:, 1])
    msg.scores = _f32(_as_numpy(scores))
    if inliers is not None and len(inliers):
        msg.inliers = _u8(_as_numpy(inliers))
    return msg


def matches_from_msg(msg: Matches) -> dict[str, np.ndarray]:
    return {
        "keypoints0": np.stack([np.frombuffer(msg.x0, np.float32), np.frombuffer(msg.y0, np.float32)], 1),
        "keypoints1": np.stack([np.frombuffer(msg.x1, np.float32), np.frombuffer(msg.y1, np.float32)], 1),
        "scores": np.frombuffer(msg.scores, dtype=np.float32),
        "inliers": np.frombuffer(msg.inliers, dtype=np.uint8),
    }


def image_msg_to_array(msg: Image) -> np.ndarray:
    """The frame as a raw (native dtype/channels) array view; ImageDecodeError if malformed."""
    return image_from_buffer(msg.data, msg.height, msg.width, msg.encoding, msg.step,
                             bool(msg.is_bigendian))


def image_msg_problem(msg) -> str | None:
    """Why a sensor_msgs/Image or CompressedImage cannot be decoded, from what is cheap to
    check (encoding, sizes, step, data length; empty or oversized compressed data), or
    None. Microseconds: no pixel is copied or decoded."""
    try:
        if isinstance(msg, CompressedImage):
            check_compressed(msg.data)
        else:
            image_msg_to_array(msg)
    except ImageDecodeError as exc:
        return str(exc)
    return None


def image_msg_to_model_input(msg) -> np.ndarray:
    """uint8 mono or RGB from a sensor_msgs/Image or CompressedImage."""
    if isinstance(msg, CompressedImage):
        return decode_compressed(msg.data)
    return to_model_input(image_msg_to_array(msg), msg.encoding)


def array_to_image_msg(image: np.ndarray, encoding: str | None = None, header=None) -> Image:
    """sensor_msgs/Image from an HxW or HxWxC array (uint8 or uint16), packed rows."""
    image = np.ascontiguousarray(image)
    msg = Image(height=image.shape[0], width=image.shape[1],
                encoding=encoding or model_input_encoding(image))
    if header is not None:
        msg.header = header
    msg.is_bigendian = image.dtype.byteorder == ">"
    # Not strides[0]: a one-row view is contiguous whatever its row stride says.
    msg.step = image.itemsize * int(np.prod(image.shape[1:]))
    msg.data = image.tobytes()
    return msg
