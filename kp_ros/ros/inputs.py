"""Frame inputs of the node base: the subscriptions that turn messages into FrameBundles.

An input owns its subscriptions and calls ``on_bundle(bundle)`` for every frame (or
synchronized set of frames) that arrives, and ``on_reject(msg, reason)`` for a message
refused on arrival (cheap checks: encoding, sizes, stamp), so a bad frame never takes the
keep-latest slot. The node base does not know which kind it has: a stereo input is another
class with the same interface (``topic``, ``describe_qos``, ``matched_publishers``,
``problem``, ``counters``).
"""
from __future__ import annotations

from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from kp_ros.core.frames import FrameBundle
from kp_ros.core.stamps import stamp_ns, stamp_problem
from kp_ros.ros.conversions import image_msg_problem
from kp_ros.ros.image_input import ImageInput

CAMERA_INFO_DEPTH = 10  # drivers publish it with every frame; the latest one is used


class MonoInput:
    """One camera: ``image`` (or ``image/compressed``) and its ``camera_info`` sibling,
    both relative names that users remap (image_pipeline's convention)."""

    def __init__(self, node, on_bundle, on_reject, *, use_compressed: bool, reliability: str,
                 on_camera_info=None):
        self._on_bundle, self._on_reject = on_bundle, on_reject
        self._on_camera_info = on_camera_info
        self.camera_info = None  # the latest CameraInfo, attached to each bundle
        topic, msg_type = ("image/compressed", CompressedImage) if use_compressed else ("image", Image)
        self.image = ImageInput(node, msg_type, topic, reliability, self.on_image)
        self.camera_info_topic = node.resolve_topic_name("camera_info")
        node.create_subscription(CameraInfo, "camera_info", self._on_info, CAMERA_INFO_DEPTH)

    # The node base shows these on /diagnostics and in its start-up line.
    @property
    def topic(self) -> str:
        return self.image.topic

    @property
    def problem(self) -> str | None:
        return self.image.problem

    def describe_qos(self) -> str:
        return self.image.describe_qos()

    def matched_publishers(self) -> int:
        return self.image.matched_publishers()

    @property
    def counters(self) -> dict:
        return {"lost": self.image.lost}

    def _on_info(self, msg: CameraInfo) -> None:
        self.camera_info = msg
        if self._on_camera_info is not None:
            self._on_camera_info(msg)

    def on_image(self, msg) -> None:
        """The image subscription callback (tests call it to hand in a frame directly)."""
        problem = image_msg_problem(msg) or stamp_problem(msg.header.stamp)
        if problem is not None:
            self._on_reject(msg, problem)
            return
        self._on_bundle(FrameBundle((msg,), stamp_ns(msg.header.stamp), (self.camera_info,)))
