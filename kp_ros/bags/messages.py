"""rosbags message types and messages for the bag tools (pure Python, no ROS).

- ``kp_ros_typestore``: the ROS 2 types plus kp_ros/msg/Keypoints, Matches, Tracks and
  StereoMatches,
  parsed from the package's own .msg files, so the definitions written into a bag are the
  ones a ROS install generates (same RIHS01 hashes) and ``ros2 bag info/play`` can use them.
- ``keypoints_msg`` / ``matches_msg`` / ``tracks_msg`` / ``stereo_matches_msg``: numpy in, rosbags message out,
  built from kp_ros.core.messages' fields (the same fields the rclpy messages get);
  ``*_from_msg`` read them back (also kp_ros.core.messages').
- ``bag_typestore`` / ``deserialize``: reading kp_ros messages back from a bag, also one
  recorded by an older kp_ros (Matches from before index0 / index1): decoded with the
  definition the bag carries, else with the older one, else a ValueError saying so.
- ``image_msg`` / ``compressed_image_msg``: sensor_msgs images from arrays or encoded bytes.
- ``point_cloud_msg``: sensor_msgs/PointCloud from a kp_ros.core.vins.VinsCloud (the VINS
  feature cloud, as track_node's ~/feature).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from kp_ros.core.messages import (keypoints_fields, keypoints_from_msg, matches_fields,
                                  matches_from_msg, stereo_matches_fields,
                                  stereo_matches_from_msg, tracks_fields, tracks_from_msg)
from kp_ros.core.package_files import msg_dir
from kp_ros.core.stamps import stamp_ns

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
KEYPOINTS_TYPE = "kp_ros/msg/Keypoints"
MATCHES_TYPE = "kp_ros/msg/Matches"
TRACKS_TYPE = "kp_ros/msg/Tracks"
STEREO_MATCHES_TYPE = "kp_ros/msg/StereoMatches"
POINT_CLOUD_TYPE = "sensor_msgs/msg/PointCloud"  # a standard type: in every ROS 2 store
# The newest ROS 2 store this rosbags has (Kilted in 0.11.9); bags written with it carry
# full definitions, so older distros' readers decode them too.
_STORE = getattr(Stores, "ROS2_KILTED", Stores.LATEST)


@lru_cache(maxsize=1)
def _kp_ros_types() -> dict:
    types = {}
    for name in ("Keypoints", "Matches", "Tracks", "StereoMatches"):
        text = (msg_dir() / f"{name}.msg").read_text()
        types.update(get_types_from_msg(text, f"kp_ros/msg/{name}"))
    return types


def kp_ros_typestore():
    """A fresh rosbags Typestore: the ROS 2 standard types plus kp_ros/msg/*."""
    typestore = get_typestore(_STORE)
    typestore.register(_kp_ros_types())
    return typestore


def bag_typestore(reader):
    """``kp_ros_typestore`` with each kp_ros type as ``reader``'s bag (a rosbags Reader)
    recorded it, where the bag carries its .msg definition (rosbag2 since Iron; every bag
    kp_ros writes): a Matches recorded before index0 / index1 existed then decodes, and
    ``matches_from_msg`` gives it empty indices (track linking falls back to the radius)."""
    ours = _kp_ros_types()
    types = dict(ours)
    for connection in reader.connections:
        msgdef = getattr(connection, "msgdef", None)
        if connection.msgtype in ours and msgdef is not None and msgdef.data \
                and msgdef.format.name == "MSG":
            types[connection.msgtype] = get_types_from_msg(msgdef.data, connection.msgtype)[
                connection.msgtype]
    typestore = get_typestore(_STORE)
    typestore.register(types)
    return typestore


@lru_cache(maxsize=1)
def _older_typestore():
    """kp_ros/msg/Matches as kp_ros first defined it (no index0 / index1): what an older
    kp_ros recorded, for bags that do not carry their definitions (rosbag2 before Iron)."""
    text = "\n".join(line for line in (msg_dir() / "Matches.msg").read_text().splitlines()
                     if not line.startswith("int32[] index"))
    typestore = get_typestore(_STORE)
    typestore.register(get_types_from_msg(text, MATCHES_TYPE))
    return typestore


def deserialize(typestore, data, msgtype: str):
    """``typestore.deserialize_cdr``, where a kp_ros/msg/Matches that does not decode with
    the typestore's definition is tried with the older one (no index0 / index1); ValueError
    naming the type and what to do when neither fits."""
    try:
        return typestore.deserialize_cdr(data, msgtype)
    except Exception as err:  # noqa: BLE001 - rosbags raises SerdeError, struct.error, ...
        failure = err
    if msgtype == MATCHES_TYPE:
        try:
            return _older_typestore().deserialize_cdr(data, msgtype)
        except Exception:  # noqa: BLE001 - report the first failure
            pass
    raise ValueError(f"cannot decode a {msgtype} of {len(data)} bytes with this kp_ros's definition"
                     f"{' or the one before index0 / index1' if msgtype == MATCHES_TYPE else ''} "
                     f"({type(failure).__name__}: {failure}); a bag from another kp_ros version "
                     f"decodes with bag_typestore(reader), which takes the bag's own definitions"
                     ) from failure


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time (anything with sec, nanosec) -> int nanoseconds; BadStamp
    (a ValueError) for a stamp that is not a time (kp_ros.core.stamps, as the nodes)."""
    return stamp_ns(stamp)


def time_msg(typestore, stamp_ns: int):
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return typestore.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)


def header_msg(typestore, stamp_ns: int, frame_id: str):
    return typestore.types["std_msgs/msg/Header"](stamp=time_msg(typestore, stamp_ns),
                                                  frame_id=frame_id)


def keypoints_msg(typestore, header, height: int, width: int, detector: str, keypoints_xy,
                  scores, descriptors=None):
    """kp_ros/msg/Keypoints from (N,2) x,y, (N,) scores, optional (N,D) descriptors (numpy)."""
    fields = keypoints_fields(height, width, detector, keypoints_xy, scores, descriptors)
    return typestore.types[KEYPOINTS_TYPE](header=header, **fields)


def matches_msg(typestore, header, stamp0, frame_id0: str, height: int, width: int,
                matcher: str, keypoints0, keypoints1, scores, inliers=None,
                index0=None, index1=None):
    """kp_ros/msg/Matches: ``header`` of the newer frame, ``stamp0``/``frame_id0`` of the older."""
    fields = matches_fields(frame_id0, height, width, matcher, keypoints0, keypoints1, scores,
                            inliers, index0, index1)
    return typestore.types[MATCHES_TYPE](header=header, stamp0=stamp0, **fields)


def tracks_msg(typestore, header, height: int, width: int, tracks, keypoints_right=None,
               depth=None):
    """kp_ros/msg/Tracks from a kp_ros.core.tracks.FrameTracks (stereo: right keypoints, depths)."""
    fields = tracks_fields(height, width, tracks, keypoints_right, depth)
    return typestore.types[TRACKS_TYPE](header=header, **fields)


def stereo_matches_msg(typestore, header, stamp_right, frame_id_right: str, height: int,
                       width: int, matcher: str, matches, rig):
    """kp_ros/msg/StereoMatches: ``header`` of the left image; a StereoMatchSet and its rig."""
    fields = stereo_matches_fields(frame_id_right, height, width, matcher, matches, rig)
    return typestore.types[STEREO_MATCHES_TYPE](header=header, stamp_right=stamp_right, **fields)


def point_cloud_msg(typestore, header, cloud):
    """sensor_msgs/msg/PointCloud from a VinsCloud: one Point32 per point, one
    ChannelFloat32 per channel, in the cloud's order."""
    types = typestore.types
    point = types["geometry_msgs/msg/Point32"]
    channel = types["sensor_msgs/msg/ChannelFloat32"]
    return types[POINT_CLOUD_TYPE](
        header=header, points=[point(x=x, y=y, z=z) for x, y, z in cloud.points.tolist()],
        channels=[channel(name=name, values=np.ascontiguousarray(values, np.float32))
                  for name, values in zip(cloud.channel_names, cloud.channels)])


_IMAGE_CHANNELS = {"mono8": 1, "rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4}


def image_msg(typestore, image: np.ndarray, encoding: str, header):
    """sensor_msgs/msg/Image with packed rows from a uint8 HxW or HxWxC array already in
    ``encoding``'s channel order (mono8, rgb8, bgr8, rgba8, bgra8)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    channels = 1 if image.ndim == 2 else image.shape[2]
    if _IMAGE_CHANNELS.get(encoding) != channels:
        raise ValueError(f"a {channels}-channel image cannot be published as {encoding!r}")
    height, width = image.shape[:2]
    return typestore.types[IMAGE_TYPE](
        header=header, height=height, width=width, encoding=encoding, is_bigendian=0,
        step=width * channels, data=image.reshape(-1))


def compressed_image_msg(typestore, data: bytes, fmt: str, header):
    """sensor_msgs/msg/CompressedImage holding already-encoded bytes (``fmt``: jpeg, png)."""
    return typestore.types[COMPRESSED_TYPE](
        header=header, format=fmt, data=np.frombuffer(bytes(data), dtype=np.uint8).copy())


__all__ = [
    "COMPRESSED_TYPE", "IMAGE_TYPE", "IMAGE_TYPES", "KEYPOINTS_TYPE", "MATCHES_TYPE", "POINT_CLOUD_TYPE",
    "STEREO_MATCHES_TYPE", "TRACKS_TYPE", "bag_typestore", "compressed_image_msg", "deserialize",
    "header_msg", "image_msg", "keypoints_from_msg", "keypoints_msg", "kp_ros_typestore",
    "matches_from_msg", "matches_msg", "msg_dir", "point_cloud_msg", "stamp_to_ns",
    "stereo_matches_from_msg", "stereo_matches_msg", "time_msg", "tracks_from_msg", "tracks_msg",
]
