"""numpy <-> kp_ros / sensor_msgs messages (rclpy), through bytes and array.array.

Which array goes into which field is kp_ros.core.messages' (shared with the bag tools);
this file only hands the arrays to rclpy. Filling a float32[] field from a numpy array
element by element costs 30-50 ms for a 2000x256 descriptor block; going through
``array.array.frombytes`` costs < 0.5 ms, and reading back with ``np.frombuffer``
(kp_ros.core.messages' ``*_from_msg``, re-exported here) is zero-copy.
"""
from __future__ import annotations

import array

import numpy as np
from sensor_msgs.msg import CompressedImage, Image

from kp_ros.core.image_codec import (ImageDecodeError, check_compressed, decode_compressed,
                                     image_from_buffer, model_input_encoding, to_model_input)
from kp_ros.core.messages import (keypoint_positions, keypoints_fields, keypoints_from_msg,
                                  matches_fields, matches_from_msg, stereo_matches_fields,
                                  stereo_matches_from_msg, tracks_fields, tracks_from_msg)
from kp_ros.msg import Keypoints, Matches, StereoMatches, Tracks

# numpy dtype -> array.array typecode of the same item (Linux: I = 4, Q = 8 bytes).
_TYPECODES = {np.dtype(np.float32): "f", np.dtype(np.uint8): "B", np.dtype(np.uint32): "I",
              np.dtype(np.int32): "i", np.dtype(np.uint64): "Q"}


def as_rclpy_arrays(fields: dict) -> dict:
    """kp_ros.core.messages fields with each numpy array as the array.array rclpy stores
    (one ``frombytes`` copy; rclpy's setters take an array.array of the right typecode as is)."""
    out = {}
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            value, values = array.array(_TYPECODES[value.dtype]), value
            value.frombytes(values.view(np.uint8))  # contiguous (messages' fields): no copy in between
        out[name] = value
    return out


def keypoints_to_msg(header, height: int, width: int, detector: str, keypoints_xy,
                     scores, descriptors=None) -> Keypoints:
    """Keypoints message from (N,2) x,y, (N,) scores and optional (N,D) descriptors (numpy)."""
    fields = keypoints_fields(height, width, detector, keypoints_xy, scores, descriptors)
    return Keypoints(header=header, **as_rclpy_arrays(fields))


def matches_to_msg(header, stamp0, frame_id0: str, height: int, width: int, matcher: str,
                   keypoints0, keypoints1, scores, inliers=None,
                   index0=None, index1=None) -> Matches:
    """Matches message: header of the newer frame, stamp0/frame_id0 of the older one."""
    fields = matches_fields(frame_id0, height, width, matcher, keypoints0, keypoints1, scores,
                            inliers, index0, index1)
    return Matches(header=header, stamp0=stamp0, **as_rclpy_arrays(fields))


def tracks_to_msg(header, height: int, width: int, tracks, keypoints_right=None,
                  depth=None) -> Tracks:
    """kp_ros/Tracks from a kp_ros.core.tracks.FrameTracks (stereo: right keypoints, depths)."""
    fields = tracks_fields(height, width, tracks, keypoints_right, depth)
    return Tracks(header=header, **as_rclpy_arrays(fields))


def stereo_matches_to_msg(header, stamp_right, frame_id_right: str, height: int, width: int,
                          matcher: str, matches, rig) -> StereoMatches:
    """kp_ros/StereoMatches: ``header`` of the left image; a StereoMatchSet and its StereoRig."""
    fields = stereo_matches_fields(frame_id_right, height, width, matcher, matches, rig)
    return StereoMatches(header=header, stamp_right=stamp_right, **as_rclpy_arrays(fields))


# The one checked conversion (BadStamp, a ValueError, for a stamp that is not a time),
# re-exported: inputs check with stamp_problem first, so a bad stamp is a counted reject.
from kp_ros.core.stamps import stamp_ns  # noqa: E402,F401


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


__all__ = ["array_to_image_msg", "as_rclpy_arrays", "image_msg_problem", "image_msg_to_array",
           "image_msg_to_model_input", "keypoint_positions", "keypoints_from_msg", "keypoints_to_msg",
           "matches_from_msg", "matches_to_msg", "stereo_matches_from_msg",
           "stereo_matches_to_msg", "tracks_from_msg", "tracks_to_msg"]
