"""lightglue_node: LightGlue matches between each Keypoints frame and the previous one.

Subscribes ``keypoints`` (kp_ros/Keypoints, e.g. superpoint_node's: positions, scores,
descriptors) and publishes ``matches`` (kp_ros/Matches with ``index0`` / ``index1``, the
keypoint indices into the two Keypoints messages; header of the newer frame, stamp0 /
frame_id0 of the older). The stream rules are eloftr_node's (kp_ros/core/pipeline.py):
stamps judged on arrival (``max_frame_gap``, backwards stamps), size changes and failures
reset the stream, keep-latest under load, exact accounting, /diagnostics. For
``~/debug_image`` (when subscribed or ``debug_image``) the node also subscribes ``image``
and draws on the frames whose images arrived; ``camera_info`` serves 'essential'.
"""
from __future__ import annotations

import warnings

from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, Image

from kp_ros.core import params
from kp_ros.core.image_codec import ImageDecodeError
from kp_ros.core.lightglue import LightGlueStreamMatcher, PARAM_NAMES
from kp_ros.core.messages import keypoints_from_msg
from kp_ros.core.pipeline import FeaturePipeline
from kp_ros.core.precision import PrecisionWarning
from kp_ros.msg import Keypoints, Matches
from kp_ros.nodes.eloftr_node import EfficientLoFTRNode
from kp_ros.ros.conversions import image_msg_to_model_input, matches_to_msg
from kp_ros.ros.feature_node import FeatureNode, ros_params, run_node
from kp_ros.ros.frame_worker import FrameRejected
from kp_ros.ros.image_input import ImageInput
from kp_ros.ros.qos import image_input_qos, output_qos

IMAGES_KEPT = 8  # frames kept for the overlay, waiting for their keypoints' turn


def _stamp_ns(stamp) -> int:
    return Time.from_msg(stamp).nanoseconds


def keypoints_problem(msg, descriptor_size: int) -> str | None:
    """Why a Keypoints message cannot be matched (cheap checks, on arrival), or None."""
    n = len(msg.x)
    if not (len(msg.y) == len(msg.scores) == n):
        return f"Keypoints with {n} x, {len(msg.y)} y, {len(msg.scores)} scores"
    if n and int(msg.descriptor_size) != descriptor_size:
        return (f"Keypoints with descriptor_size {msg.descriptor_size}: the model takes "
                f"{descriptor_size}")
    if len(msg.descriptors) != n * int(msg.descriptor_size):
        return f"Keypoints with {len(msg.descriptors)} descriptor values for {n} x {msg.descriptor_size}"
    if msg.height == 0 or msg.width == 0:
        return "Keypoints with an empty image size"
    return None


class LightGlueNode(FeatureNode):
    NODE_NAME = "lightglue_node"
    MODEL_PARAMS = ros_params(params.NODES["lightglue_node"])
    COMMON = ()

    def __init__(self, **kwargs):
        super().__init__(self.NODE_NAME, **kwargs)
        self._pub = self.create_publisher(Matches, "matches", output_qos())
        self.pipeline = FeaturePipeline(matcher=self.core, max_frame_gap=self.values["max_frame_gap"])
        self._camera_key, self._warned_no_camera = None, False
        self.create_subscription(CameraInfo, "camera_info", self.on_camera_info, 10)
        self._images: dict[int, Image] = {}
        self._image_sub = None

    on_camera_info = EfficientLoFTRNode.on_camera_info  # the same calibration handling

    def build_core(self, values: dict) -> LightGlueStreamMatcher:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)  # logged below as a ROS warning
            core = LightGlueStreamMatcher(values["model"], device=values["device"],
                                          precision=values["precision"],
                                          **{name: values[name] for name in PARAM_NAMES})
        if core.precision.warning:
            self.get_logger().warning(core.precision.warning)
        return core

    def apply_params(self, changes: dict) -> None:
        if "max_frame_gap" in changes:
            self.pipeline.max_frame_gap = changes["max_frame_gap"]
        self.core.set_params(**{k: v for k, v in changes.items() if k in PARAM_NAMES})

    def start(self) -> None:
        if self.input is not None:
            return
        self.input = ImageInput(self, Keypoints, "keypoints", self.values["reliable_input"],
                                self.on_keypoints)
        self.create_timer(self.values["diagnostics_period"], self._publish_diagnostics)
        self.create_timer(0.25, self._update_image_subscription)

    def describe(self) -> str:
        return (f"LightGlue {self.core.model_id} on {self.core.device}, "
                f"precision {self.core.precision.note}")

    # --- inputs ---------------------------------------------------------------------
    def on_keypoints(self, msg: Keypoints) -> None:
        """Checked on arrival (a bad message never displaces a good one), then handed to
        the keep-latest worker with its arrival epoch (stamp continuity)."""
        problem = keypoints_problem(msg, self.core.descriptor_size)
        if problem is not None:
            self.worker.reject(problem)
            self._log_rejected(msg, problem, FrameRejected(problem))
            return
        self.worker.submit((msg, self.pipeline.arrive(_stamp_ns(msg.header.stamp))))

    def on_image(self, msg: Image) -> None:
        self._images[_stamp_ns(msg.header.stamp)] = msg
        while len(self._images) > IMAGES_KEPT:
            del self._images[min(self._images)]

    def _update_image_subscription(self) -> None:
        wanted = self.debug_wanted()
        if wanted and self._image_sub is None:
            self._image_sub = self.create_subscription(Image, "image", self.on_image,
                                                       image_input_qos(False))
        elif not wanted and self._image_sub is not None:
            self.destroy_subscription(self._image_sub)
            self._image_sub, self._images = None, {}

    # --- the frame ------------------------------------------------------------------
    def _process_frame(self, item) -> None:
        msg, arrival = item
        self._warn_if_no_camera()
        stamp_ns = _stamp_ns(msg.header.stamp)
        try:
            step = self.pipeline.match_keypoints(
                keypoints_from_msg(msg), (msg.height, msg.width), stamp_ns, token=msg.header,
                arrival=arrival, image=self._overlay_image(stamp_ns))
        except ValueError as exc:  # the pipeline restarted the stream
            raise FrameRejected(str(exc)) from exc
        if step.reset:
            self.get_logger().warning(f"stream reset, no matches for this frame: {step.reset}")
        if step.matches is None:
            return
        found, header0 = step.matches, step.previous
        self._pub.publish(matches_to_msg(
            msg.header, header0.stamp, header0.frame_id, msg.height, msg.width, self.core.model_id,
            found["keypoints0"], found["keypoints1"], found["scores"], found["inliers"],
            found["index0"], found["index1"]))
        if step.overlay is not None:
            self.publish_debug(step.overlay, msg.header)

    def _overlay_image(self, stamp_ns: int):
        """The frame's image for the overlay, when one is wanted and has arrived."""
        image_msg = self._images.get(stamp_ns) if self.debug_wanted() else None
        if image_msg is None:
            return None
        try:
            return image_msg_to_model_input(image_msg)
        except ImageDecodeError as exc:
            self.get_logger().warning(f"debug image: {exc}")
            return None

    def _warn_if_no_camera(self) -> None:
        if self.core.params.geometric_verification == "essential" and self.core.camera is None \
                and not self._warned_no_camera:
            self._warned_no_camera = True
            self.get_logger().warning(
                f"geometric_verification essential: no camera_info on "
                f"{self.resolve_topic_name('camera_info')} yet; verifying with a fundamental "
                f"matrix until one arrives")

    @property
    def resets(self) -> int:
        return self.pipeline.resets

    def shutdown(self) -> None:
        super().shutdown()
        self.get_logger().info(f"stream resets: {self.resets}")


def main(args=None) -> int:
    return run_node(LightGlueNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
