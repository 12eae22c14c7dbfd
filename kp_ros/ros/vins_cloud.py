"""The VINS feature cloud in ROS: ``cloud_to_msg`` (a kp_ros.core.vins.VinsCloud as the
sensor_msgs/PointCloud both estimators subscribe to), ``cloud_to_cdr`` (the same message
serialized) and ``VinsOutput``, track_node's ``~/feature`` publisher with the camera_info
subscriptions it needs (docs/vins.md).

A PointCloud's points are a sequence of Point32 messages: built one Python object at a
time they cost ~5 us each (~10 ms for a stereo frame's 2000). Their CDR bytes are the
(M, 3) float32 array as it is, so the message is written as bytes (numpy ``tobytes``) and
published raw; ``cloud_to_msg`` deserializes those bytes when a message object is wanted.
"""
from __future__ import annotations

import struct
import time
from collections import Counter

import numpy as np
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CameraInfo, PointCloud

from kp_ros.core.geometry import CameraInfoCache
from kp_ros.core.vins import VinsCloud, VinsFeatures
from kp_ros.ros.conversions import stamp_ns
from kp_ros.ros.inputs import CAMERA_INFO_DEPTH
from kp_ros.ros.qos import output_qos

LOG_PERIOD = 1.0  # s between two log lines about missing or unusable calibration


_CDR_LE = b"\x00\x01\x00\x00"  # encapsulation: plain CDR, little endian


def _cdr_string(text: str, offset: int) -> bytes:
    """A CDR string at ``offset`` (from the body's start): aligned to 4, length with the NUL."""
    data = text.encode() + b"\0"
    return b"\0" * (-offset % 4) + struct.pack("<I", len(data)) + data


def cloud_to_cdr(header, cloud: VinsCloud) -> bytes:
    """The serialized sensor_msgs/PointCloud (CDR, as rclpy's serialize_message gives it):
    ``header`` (std_msgs/Header), one Point32 per point, one ChannelFloat32 per channel."""
    parts = [struct.pack("<iI", header.stamp.sec, header.stamp.nanosec)]
    size = 8

    def add(data: bytes) -> None:
        nonlocal size
        parts.append(data)
        size += len(data)
    add(_cdr_string(header.frame_id, size))
    add(b"\0" * (-size % 4) + struct.pack("<I", len(cloud.points)))
    add(np.ascontiguousarray(cloud.points, "<f4").tobytes())  # Point32: x, y, z float32
    add(struct.pack("<I", len(cloud.channel_names)))
    for name, values in zip(cloud.channel_names, cloud.channels):
        add(_cdr_string(name, size))
        add(b"\0" * (-size % 4) + struct.pack("<I", len(values)))
        add(np.ascontiguousarray(values, "<f4").tobytes())
    return _CDR_LE + b"".join(parts)


def cloud_to_msg(header, cloud: VinsCloud) -> PointCloud:
    """sensor_msgs/PointCloud (from ``cloud_to_cdr``'s bytes: no per-point setter)."""
    return deserialize_message(cloud_to_cdr(header, cloud), PointCloud)


class _Calibration:
    """The newest usable CameraModel of one camera_info topic (None until one arrives)."""

    def __init__(self, output: "VinsOutput", side: str):
        self.output, self.side = output, side
        self._cache = CameraInfoCache()

    @property
    def camera(self):
        return self._cache.camera

    def on_info(self, msg: CameraInfo) -> None:
        if self._cache.update(msg) and self._cache.problem is not None:
            self.output.count(f"vins bad {self.side} camera_info", f"{self.side} camera_info: {self._cache.problem}")


class VinsOutput:
    """``~/feature`` (sensor_msgs/PointCloud) for each published frame of tracks; counts
    what it cannot publish (no calibration yet, another image size) instead of failing.

    ``subscribe`` (track_node): the calibration comes from ``camera_info`` and, for fusion,
    ``right/camera_info`` (relative: remap them beside the images), and ``publish`` takes a
    Tracks message. Without (frontend_node, whose frames carry their camera_info):
    ``publish_frame`` takes the cameras."""

    def __init__(self, node, layout: str, num_cameras: int | None = None, subscribe: bool = True):
        self.node = node
        # VINS-Mono's NUM_OF_CAM is a constant 1 (parameters.h): a right observation has no
        # encoding there. VINS-Fusion's camera id channel takes 0 and 1 as they are.
        if num_cameras is None:
            num_cameras = 2 if layout == "fusion" else 1
        self.features = VinsFeatures(layout, num_cameras=num_cameras)
        self.counts = Counter()
        self._last_log = 0.0
        self.left, self.right = _Calibration(self, "left"), _Calibration(self, "right")
        self.publisher = node.create_publisher(PointCloud, "~/feature", output_qos())
        self._subs = []
        if subscribe:
            self._subs.append(node.create_subscription(CameraInfo, "camera_info", self.left.on_info,
                                                       CAMERA_INFO_DEPTH))
            if num_cameras == 2:
                self._subs.append(node.create_subscription(CameraInfo, "right/camera_info",
                                                           self.right.on_info, CAMERA_INFO_DEPTH))

    def count(self, what: str, text: str) -> None:
        """Count one problem; log it at most once per LOG_PERIOD (the counter has them all)."""
        self.counts[what] += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_PERIOD:
            self._last_log = now
            self.node.get_logger().warning(f"{text} (so far: {self.counts[what]})")

    def _info_topic(self, side: int) -> str:
        return self._subs[side].topic_name if len(self._subs) > side else \
            ("the frames' " + ("right " if side else "") + "camera_info")

    def publish(self, tracks_msg, keypoints) -> None:
        """The cloud of one Tracks message (``keypoints``: its (N, 2) left positions), with
        the subscribed calibration."""
        right = None
        if len(tracks_msg.x_right):
            right = np.stack([np.frombuffer(tracks_msg.x_right, np.float32),
                              np.frombuffer(tracks_msg.y_right, np.float32)], axis=1)
        self.publish_frame(tracks_msg.header, tracks_msg.width, tracks_msg.height,
                           np.frombuffer(tracks_msg.ids, np.uint64), keypoints,
                           self.left.camera, right, self.right.camera)

    def publish_frame(self, header, width: int, height: int, ids, keypoints, camera,
                      keypoints_right=None, camera_right=None) -> None:
        """The cloud of one frame's tracks (``ids``, ``keypoints`` (N, 2) left positions;
        ``keypoints_right`` (N, 2), NaN where none, for a stereo frame) from the cameras
        (geometry.CameraModel, None: not known yet)."""
        if camera is None:
            return self.count("vins no camera_info",
                              f"no usable sensor_msgs/CameraInfo on {self._info_topic(0)} yet: "
                              f"frame not published on {self.publisher.topic_name}")
        if (camera.width, camera.height) not in ((0, 0), (width, height)):
            # Not scaled: binning, cropping and a driver's resize change K differently.
            return self.count("vins camera_info size mismatch",
                              f"camera_info is for {camera.width}x{camera.height} images, the "
                              f"tracks' are {width}x{height}: frame not published on "
                              f"{self.publisher.topic_name}")
        if keypoints_right is not None and self.features.num_cameras == 2 and camera_right is None:
            self.count("vins no right camera_info",
                       f"stereo tracks but no usable CameraInfo on {self._info_topic(1)}: "
                       f"right points left out")
        if self.features.num_cameras < 2 or camera_right is None:
            keypoints_right = None
        try:
            cloud = self.features.frame(stamp_ns(header.stamp), ids, keypoints, camera,
                                        keypoints_right, camera_right)
        except ValueError as exc:
            return self.count("vins rejected", f"VINS cloud not built: {exc}")
        self.publisher.publish(cloud_to_cdr(header, cloud))
        self.counts["vins published"] += 1

    def values(self) -> dict:
        """Counters for /diagnostics."""
        return {**self.counts, **{k: v for k, v in self.features.counters.items()}}
