"""The VINS feature cloud in ROS: ``cloud_to_msg`` (a kp_ros.core.vins.VinsCloud as the
sensor_msgs/PointCloud both estimators subscribe to) and ``VinsOutput``, track_node's
``~/feature`` publisher with the camera_info subscriptions it needs (docs/vins.md)."""
from __future__ import annotations

import array
import time
from collections import Counter

import numpy as np
from geometry_msgs.msg import Point32
from sensor_msgs.msg import CameraInfo, ChannelFloat32, PointCloud

from kp_ros.core.geometry import camera_from_info, camera_info_key
from kp_ros.core.vins import VinsCloud, VinsFeatures
from kp_ros.ros.conversions import stamp_ns
from kp_ros.ros.inputs import CAMERA_INFO_DEPTH
from kp_ros.ros.qos import output_qos

LOG_PERIOD = 1.0  # s between two log lines about missing or unusable calibration


def cloud_to_msg(header, cloud: VinsCloud) -> PointCloud:
    """sensor_msgs/PointCloud: one Point32 per point, one ChannelFloat32 per channel
    (values through array.array.frombytes: one copy, no per-element setter)."""
    points = [Point32(x=x, y=y, z=z) for x, y, z in cloud.points.tolist()]
    channels = []
    for name, values in zip(cloud.channel_names, cloud.channels):
        floats = array.array("f")
        floats.frombytes(np.ascontiguousarray(values, np.float32).tobytes())
        channels.append(ChannelFloat32(name=name, values=floats))
    return PointCloud(header=header, points=points, channels=channels)


class _Calibration:
    """The newest usable CameraModel of one camera_info topic (None until one arrives)."""

    def __init__(self, output: "VinsOutput", side: str):
        self.output, self.side = output, side
        self.camera = None
        self._key = None

    def on_info(self, msg: CameraInfo) -> None:
        key = camera_info_key(msg.k, msg.d, msg.distortion_model, msg.width, msg.height)
        if key == self._key:
            return  # drivers repeat the calibration with every frame: judged once
        self._key = key
        try:
            self.camera = camera_from_info(msg.k, msg.d, msg.distortion_model, msg.width, msg.height)
        except ValueError as exc:
            self.camera = None
            self.output.count(f"vins bad {self.side} camera_info", f"{self.side} camera_info: {exc}")


class VinsOutput:
    """``~/feature`` (sensor_msgs/PointCloud) for each published Tracks: subscribes
    ``camera_info`` and ``right/camera_info`` (relative: remap them beside the images),
    counts what it cannot publish (no calibration yet) instead of failing."""

    def __init__(self, node, layout: str):
        self.node = node
        # VINS-Mono's NUM_OF_CAM is a constant 1 (parameters.h): a right observation has no
        # encoding there. VINS-Fusion's camera id channel takes 0 and 1 as they are.
        self.features = VinsFeatures(layout, num_cameras=2 if layout == "fusion" else 1)
        self.counts = Counter()
        self._last_log = 0.0
        self.left, self.right = _Calibration(self, "left"), _Calibration(self, "right")
        self.publisher = node.create_publisher(PointCloud, "~/feature", output_qos())
        self._subs = [node.create_subscription(CameraInfo, "camera_info", self.left.on_info,
                                               CAMERA_INFO_DEPTH)]
        if layout == "fusion":
            self._subs.append(node.create_subscription(CameraInfo, "right/camera_info",
                                                       self.right.on_info, CAMERA_INFO_DEPTH))

    def count(self, what: str, text: str) -> None:
        """Count one problem; log it at most once per LOG_PERIOD (the counter has them all)."""
        self.counts[what] += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_PERIOD:
            self._last_log = now
            self.node.get_logger().warning(f"{text} (so far: {self.counts[what]})")

    def publish(self, tracks_msg, keypoints) -> None:
        """The cloud of one Tracks message (``keypoints``: its (N, 2) left positions)."""
        if self.left.camera is None:
            return self.count("vins no camera_info",
                              f"no usable sensor_msgs/CameraInfo on {self._subs[0].topic_name} yet: "
                              f"frame not published on {self.publisher.topic_name}")
        size = (tracks_msg.width, tracks_msg.height)
        if (self.left.camera.width, self.left.camera.height) not in ((0, 0), size):
            # Not scaled: binning, cropping and a driver's resize change K differently.
            return self.count("vins camera_info size mismatch",
                              f"camera_info is for {self.left.camera.width}x{self.left.camera.height} "
                              f"images, the tracks' are {size[0]}x{size[1]}: frame not published on "
                              f"{self.publisher.topic_name}")
        right = None
        if len(tracks_msg.x_right) and len(self._subs) > 1:
            if self.right.camera is None:
                self.count("vins no right camera_info",
                           f"stereo tracks but no usable CameraInfo on {self._subs[1].topic_name}: "
                           f"right points left out")
            else:
                right = np.stack([np.frombuffer(tracks_msg.x_right, np.float32),
                                  np.frombuffer(tracks_msg.y_right, np.float32)], axis=1)
        try:
            cloud = self.features.frame(stamp_ns(tracks_msg.header.stamp), np.frombuffer(
                tracks_msg.ids, np.uint64), keypoints, self.left.camera, right, self.right.camera)
        except ValueError as exc:
            return self.count("vins rejected", f"VINS cloud not built: {exc}")
        self.publisher.publish(cloud_to_msg(tracks_msg.header, cloud))
        self.counts["vins published"] += 1

    def values(self) -> dict:
        """Counters for /diagnostics."""
        return {**self.counts, **{k: v for k, v in self.features.counters.items()}}
