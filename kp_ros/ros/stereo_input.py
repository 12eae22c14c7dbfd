"""The stereo input of the node base: image_pipeline's relative names ``left/image_rect``,
``right/image_rect`` (or their ``/compressed`` variants), ``left/camera_info`` and
``right/camera_info``; left and right paired by stamp (kp_ros/core/stereo_sync.py: exact
by default, ``stereo_sync_tolerance`` seconds), each pair one FrameBundle (left, right) with
the two latest CameraInfos. Same interface as ``MonoInput`` (kp_ros/ros/inputs.py), so a
node plugs it in with ``make_input``; the pairing counters go to /diagnostics."""
from __future__ import annotations

from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from kp_ros.core.frames import FrameBundle
from kp_ros.core.stamps import stamp_ns, stamp_problem
from kp_ros.core.stereo_sync import SIDES, StereoSync
from kp_ros.ros.conversions import image_msg_problem
from kp_ros.ros.image_input import ImageInput
from kp_ros.ros.inputs import CAMERA_INFO_DEPTH


class StereoInput:
    """Two image subscriptions and their camera_info; ``on_bundle`` gets each stereo pair."""

    def __init__(self, node, on_bundle, on_reject, *, use_compressed: bool, reliability: str,
                 tolerance: float = 0.0, max_pending: int = 8):
        self._on_bundle, self._on_reject = on_bundle, on_reject
        self.sync = StereoSync(tolerance, max_pending)
        self.camera_info = {side: None for side in SIDES}  # the latest of each side
        suffix, msg_type = ("image_rect/compressed", CompressedImage) if use_compressed \
            else ("image_rect", Image)
        self.images = {side: ImageInput(node, msg_type, f"{side}/{suffix}", reliability,
                                        lambda msg, side=side: self.on_image(side, msg))
                       for side in SIDES}
        for side in SIDES:
            node.create_subscription(CameraInfo, f"{side}/camera_info",
                                     lambda msg, side=side: self._on_info(side, msg),
                                     CAMERA_INFO_DEPTH)

    @property
    def topic(self) -> str:
        return f"{self.images['left'].topic} + {self.images['right'].topic}"

    @property
    def problem(self) -> str | None:
        problems = [f"{side}: {self.images[side].problem}" for side in SIDES
                    if self.images[side].problem]
        return "; ".join(problems) or None

    def describe_qos(self) -> str:
        left, right = (self.images[side].describe_qos() for side in SIDES)
        return f"left {left}, right {right}"

    def matched_publishers(self) -> int:
        """Publishers matched on the side with fewer: a pair needs both."""
        return min(self.images[side].matched_publishers() for side in SIDES)

    @property
    def counters(self) -> dict:
        """Pairing counts (received / paired / dropped unpaired per side) and lost frames."""
        return {**self.sync.describe(),
                **{f"{side}_lost": self.images[side].lost for side in SIDES}}

    def _on_info(self, side: str, msg: CameraInfo) -> None:
        self.camera_info[side] = msg

    def on_image(self, side: str, msg) -> None:
        """An image subscription callback (tests call it to hand in a frame directly)."""
        problem = image_msg_problem(msg) or stamp_problem(msg.header.stamp)
        if problem is not None:
            self._on_reject(msg, f"{side}: {problem}")
            return
        pair = self.sync.push(side, stamp_ns(msg.header.stamp), msg)
        if pair is not None:
            self._on_bundle(FrameBundle((pair.left, pair.right), pair.stamp_ns,
                                        (self.camera_info["left"], self.camera_info["right"])))
