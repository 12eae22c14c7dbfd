"""KeypointsInput: a frame input (kp_ros/ros/inputs.py's interface) of kp_ros/Keypoints,
for a matcher of detected keypoints (lightglue_node).

Subscribes ``keypoints`` (following the publishers' reliability, kp_ros/ros/image_input.py)
and ``camera_info`` (for 'essential' verification). Cheap checks on arrival (lengths,
descriptor size, image size, stamp): a bad message is refused before the keep-latest slot.
"""
from __future__ import annotations

from sensor_msgs.msg import CameraInfo

from kp_ros.core.frames import FrameBundle
from kp_ros.core.stamps import stamp_ns, stamp_problem
from kp_ros.msg import Keypoints
from kp_ros.ros.image_input import ImageInput
from kp_ros.ros.inputs import CAMERA_INFO_DEPTH


def keypoints_problem(msg, descriptor_size: int) -> str | None:
    """Why a Keypoints message cannot be matched, or None."""
    n = len(msg.x)
    if not (len(msg.y) == len(msg.scores) == n):
        return f"Keypoints with {n} x, {len(msg.y)} y, {len(msg.scores)} scores"
    if n and int(msg.descriptor_size) != descriptor_size:
        return (f"Keypoints with descriptor_size {msg.descriptor_size}: the model takes "
                f"{descriptor_size}")
    if len(msg.descriptors) != n * int(msg.descriptor_size):
        return (f"Keypoints with {len(msg.descriptors)} descriptor values for "
                f"{n} x {msg.descriptor_size}")
    if msg.height == 0 or msg.width == 0:
        return "Keypoints with an empty image size"
    return None


class KeypointsInput:
    """``keypoints`` + ``camera_info``: one FrameBundle per Keypoints message."""

    def __init__(self, node, on_bundle, on_reject, *, reliability: str, descriptor_size: int,
                 on_camera_info=None):
        self._on_bundle, self._on_reject = on_bundle, on_reject
        self._on_camera_info = on_camera_info
        self.descriptor_size = descriptor_size
        self.camera_info = None
        self.keypoints = ImageInput(node, Keypoints, "keypoints", reliability, self.on_keypoints)
        self.camera_info_topic = node.resolve_topic_name("camera_info")
        node.create_subscription(CameraInfo, "camera_info", self._on_info, CAMERA_INFO_DEPTH)

    @property
    def topic(self) -> str:
        return self.keypoints.topic

    @property
    def problem(self) -> str | None:
        return self.keypoints.problem

    def describe_qos(self) -> str:
        return self.keypoints.describe_qos()

    def matched_publishers(self) -> int:
        return self.keypoints.matched_publishers()

    @property
    def counters(self) -> dict:
        return {"lost": self.keypoints.lost}

    def _on_info(self, msg: CameraInfo) -> None:
        self.camera_info = msg
        if self._on_camera_info is not None:
            self._on_camera_info(msg)

    def on_keypoints(self, msg) -> None:
        """The subscription callback (tests call it to hand in a frame directly)."""
        problem = keypoints_problem(msg, self.descriptor_size) or stamp_problem(msg.header.stamp)
        if problem is not None:
            self._on_reject(msg, problem)
            return
        self._on_bundle(FrameBundle((msg,), stamp_ns(msg.header.stamp), (self.camera_info,)))
