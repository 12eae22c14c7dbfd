"""numpy results <-> the fields of kp_ros/msg/Keypoints, Matches, Tracks and StereoMatches: the one place
that knows how arrays map onto message fields (x/y split, float32, the flat descriptor
block, empty inliers when unverified, uint64 ids, ...). ROS-free.

``*_fields`` return the message's fields (header and stamps excepted: those are the
message library's own types) as contiguous numpy arrays and plain scalars; both message
layers build from them: ``kp_ros.ros.conversions`` (rclpy, arrays handed over as
array.array) and ``kp_ros.bags.messages`` (rosbags, numpy arrays as they are).
``*_from_msg`` read either kind of message back: zero-copy ``np.frombuffer`` over rclpy's
array.array / bytes fields, ``np.asarray`` over rosbags' numpy fields.
"""
from __future__ import annotations

import numpy as np


_NO_INDEX = np.zeros(0, np.int32)  # a Matches from before index0 / index1 existed


def _flat(values, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=dtype).reshape(-1))


def _xy(points) -> tuple[np.ndarray, np.ndarray]:
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    return np.ascontiguousarray(points[:, 0]), np.ascontiguousarray(points[:, 1])


def keypoints_fields(height: int, width: int, detector: str, keypoints_xy, scores,
                     descriptors=None) -> dict:
    """Keypoints fields from (N,2) x,y, (N,) scores and optional (N,D) descriptors; a flat
    descriptor block gets D from N (N = 0 gives D = 0); none: D = 0, no descriptors."""
    x, y = _xy(keypoints_xy)
    descriptor_size, flat = 0, np.zeros(0, np.float32)
    if descriptors is not None:
        descriptors = np.asarray(descriptors)
        if descriptors.ndim == 2:
            descriptor_size = descriptors.shape[1]
        else:
            descriptor_size = descriptors.size // len(x) if len(x) else 0
        flat = _flat(descriptors, np.float32)
    return {"height": int(height), "width": int(width), "detector": str(detector), "x": x, "y": y,
            "scores": _flat(scores, np.float32), "descriptor_size": int(descriptor_size),
            "descriptors": flat}


def matches_fields(frame_id0: str, height: int, width: int, matcher: str, keypoints0,
                   keypoints1, scores, inliers=None, index0=None, index1=None) -> dict:
    """Matches fields (stamp0 and header excepted) from (N,2) points in the older (0) and
    newer (1) frame, (N,) scores, optional (N,) inlier flags (None or empty: unverified)
    and, from a sparse matcher, (N,) keypoint indices into each frame's Keypoints (None or
    empty: a dense matcher)."""
    x0, y0 = _xy(keypoints0)
    x1, y1 = _xy(keypoints1)
    inliers = np.zeros(0, np.uint8) if inliers is None else _flat(inliers, np.uint8)
    index0 = np.zeros(0, np.int32) if index0 is None else _flat(index0, np.int32)
    index1 = np.zeros(0, np.int32) if index1 is None else _flat(index1, np.int32)
    return {"frame_id0": str(frame_id0), "height": int(height), "width": int(width),
            "matcher": str(matcher), "x0": x0, "y0": y0, "x1": x1, "y1": y1,
            "scores": _flat(scores, np.float32), "inliers": inliers,
            "index0": index0, "index1": index1}


def tracks_fields(height: int, width: int, tracks, keypoints_right=None, depth=None) -> dict:
    """Tracks fields from a kp_ros.core.tracks.FrameTracks; stereo: (N, 2) right keypoints
    and (N,) depths, NaN where none (mono: None, the stereo fields stay empty)."""
    x, y = _xy(tracks.keypoints)
    x_right, y_right = _xy(np.zeros((0, 2)) if keypoints_right is None else keypoints_right)
    depth = _flat(() if depth is None else depth, np.float32)
    if len(x_right) not in (0, len(x)) or len(depth) != len(x_right):
        raise ValueError(f"stereo fields need one right point and one depth per keypoint "
                         f"({len(x)}), got {len(x_right)} and {len(depth)}")
    return {"height": int(height), "width": int(width), "x": x, "y": y,
            "ids": _flat(tracks.ids, np.uint64), "lengths": _flat(tracks.lengths, np.uint32),
            "previous_index": _flat(tracks.previous_index, np.int32),
            "x_right": x_right, "y_right": y_right, "depth": depth}


def stereo_matches_fields(frame_id_right: str, height: int, width: int, matcher: str,
                          matches, rig) -> dict:
    """StereoMatches fields (header and stamp_right excepted) from a
    kp_ros.core.stereo.StereoMatchSet and the StereoRig it was checked with."""
    x_left, y_left = _xy(matches.left)
    x_right, y_right = _xy(matches.right)
    return {"frame_id_right": str(frame_id_right), "height": int(height), "width": int(width),
            "matcher": str(matcher), "focal": float(rig.fx), "baseline": float(rig.baseline),
            "warning": matches.problem or "", "candidates": int(matches.candidates),
            "x_left": x_left, "y_left": y_left, "x_right": x_right, "y_right": y_right,
            "scores": _flat(matches.scores, np.float32),
            "disparity": _flat(matches.disparity, np.float32),
            "depth": _flat(matches.depth, np.float32)}


def field_array(values, dtype) -> np.ndarray:
    """A numeric array field as numpy: a zero-copy view of rclpy's array.array / bytes, or
    rosbags' numpy array as it is (np.asarray; converted only if its dtype differs)."""
    if isinstance(values, np.ndarray):
        return np.asarray(values, dtype=dtype)
    return np.frombuffer(values, dtype=dtype)


def _points(x, y) -> np.ndarray:
    return np.stack([field_array(x, np.float32), field_array(y, np.float32)], axis=1)


def keypoint_positions(msg) -> np.ndarray:
    """(N, 2) x, y of a Keypoints (or Tracks) message, without reading its descriptors."""
    return _points(msg.x, msg.y)


def keypoints_from_msg(msg) -> dict[str, np.ndarray]:
    """keypoints (N,2) x,y, scores (N,), descriptors (N,D) of a Keypoints message."""
    keypoints = keypoint_positions(msg)
    size = int(msg.descriptor_size)
    descriptors = field_array(msg.descriptors, np.float32)
    return {"keypoints": keypoints, "scores": field_array(msg.scores, np.float32),
            "descriptors": descriptors.reshape(-1, size) if size else
            descriptors.reshape(len(keypoints), 0)}


def matches_from_msg(msg) -> dict[str, np.ndarray]:
    """keypoints0/keypoints1 (N,2), scores (N,), inliers (N, or 0: unverified), index0 /
    index1 (N keypoint indices, or 0: a dense matcher) of a Matches."""
    return {"keypoints0": _points(msg.x0, msg.y0), "keypoints1": _points(msg.x1, msg.y1),
            "scores": field_array(msg.scores, np.float32),
            "inliers": field_array(msg.inliers, np.uint8),
            "index0": field_array(getattr(msg, "index0", _NO_INDEX), np.int32),
            "index1": field_array(getattr(msg, "index1", _NO_INDEX), np.int32)}


def tracks_from_msg(msg) -> dict[str, np.ndarray]:
    """keypoints (N,2), ids, lengths, previous_index of a Tracks message; stereo:
    keypoints_right (N,2 or 0,2) and depth (N or 0), NaN where none."""
    return {"keypoints": keypoint_positions(msg), "ids": field_array(msg.ids, np.uint64),
            "lengths": field_array(msg.lengths, np.uint32),
            "previous_index": field_array(msg.previous_index, np.int32),
            "keypoints_right": _points(msg.x_right, msg.y_right),
            "depth": field_array(msg.depth, np.float32)}


def stereo_matches_from_msg(msg) -> dict[str, np.ndarray]:
    """left/right (N,2), scores, disparity, depth (N,) of a StereoMatches message."""
    return {"left": _points(msg.x_left, msg.y_left), "right": _points(msg.x_right, msg.y_right),
            "scores": field_array(msg.scores, np.float32),
            "disparity": field_array(msg.disparity, np.float32),
            "depth": field_array(msg.depth, np.float32)}
