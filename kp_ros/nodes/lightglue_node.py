"""lightglue_node: LightGlue matches between each Keypoints frame and the previous one.

Subscribes ``keypoints`` (kp_ros/Keypoints, e.g. superpoint_node's: positions, scores,
descriptors) and ``camera_info``; publishes ``matches`` (kp_ros/Matches with ``index0`` /
``index1``, the keypoint indices into the two Keypoints messages; header of the newer
frame, stamp0 / frame_id0 of the older). The stream rules are eloftr_node's
(kp_ros/core/pipeline.py): stamps judged on arrival (``max_frame_gap``, backwards stamps),
size changes and failures reset the stream, keep-latest under load, exact accounting,
/diagnostics. For ``~/debug_image`` (when subscribed or ``debug_image``) the node also
subscribes ``image`` and draws on the frames whose images arrived.
"""
from __future__ import annotations

import numpy as np
from sensor_msgs.msg import Image

from kp_ros.core import models
from kp_ros.core.image_codec import ImageDecodeError
from kp_ros.core.messages import keypoints_from_msg
from kp_ros.core.stamps import stamp_ns
from kp_ros.nodes.eloftr_node import EfficientLoFTRNode
from kp_ros.ros.conversions import image_msg_to_model_input, matches_to_msg
from kp_ros.ros.diagnostics import stamp_age
from kp_ros.ros.frame_worker import FrameRejected
from kp_ros.ros.keypoints_input import KeypointsInput
from kp_ros.ros.node_base import run_node
from kp_ros.ros.qos import image_input_qos

IMAGES_KEPT = 8  # frames kept for the overlay, waiting for their keypoints' turn


class LightGlueNode(EfficientLoFTRNode):
    """eloftr_node's shell (publisher, pipeline, calibration, resets) with a Keypoints input."""
    MODEL = models.model("lightglue")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._images: dict[int, Image] = {}
        self._image_sub = None

    def make_input(self):
        self.create_timer(0.25, self._update_image_subscription)
        return KeypointsInput(self, self.on_bundle, self.reject_on_arrival,
                              reliability=self.values["reliable_input"],
                              descriptor_size=self.core.descriptor_size,
                              on_camera_info=self.on_camera_info)

    def warm_up_step(self):
        rng = np.random.default_rng(0)
        frame = {"keypoints": rng.random((512, 2), dtype=np.float32) * 400,
                 "scores": rng.random(512, dtype=np.float32),
                 "descriptors": rng.standard_normal((512, self.core.descriptor_size)) / 16}
        return lambda image: self.core.match_pair(frame, frame, (480, 640))

    # --- the overlay's images -------------------------------------------------------
    def on_image(self, msg: Image) -> None:
        self._images[stamp_ns(msg.header.stamp)] = msg
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

    def _overlay_image(self, stamp: int):
        image_msg = self._images.get(stamp) if self.debug_wanted() else None
        if image_msg is None:
            return None
        try:
            return image_msg_to_model_input(image_msg)
        except ImageDecodeError as exc:
            self.get_logger().warning(f"debug image: {exc}")
            return None

    # --- the frame ------------------------------------------------------------------
    def _process_frame(self, bundle) -> None:
        """No image to decode: the Keypoints message is the frame."""
        self.process(bundle, ())
        self._stamp_ages.append(stamp_age(self, bundle.msgs[0].header.stamp))

    def process(self, bundle, images) -> None:
        msg = bundle.msgs[0]
        self.core.camera, refused = self.calibration.for_image(msg.width, msg.height)
        if refused and self.core.params.geometric_verification == "essential":
            self.get_logger().warning(refused)
        try:
            step = self.pipeline.match_keypoints(
                keypoints_from_msg(msg), (msg.height, msg.width), bundle.stamp_ns,
                token=msg.header, arrival=bundle.arrival,
                image=self._overlay_image(bundle.stamp_ns))
        except ValueError as exc:  # the pipeline restarted the stream
            raise FrameRejected(str(exc)) from exc
        if step.reset:
            self.get_logger().warning(f"stream reset, no matches for this frame: {step.reset}")
        if step.matches is None:
            return
        found, header0 = step.matches, step.previous
        self._pub.publish(matches_to_msg(
            msg.header, header0.stamp, header0.frame_id, msg.height, msg.width,
            self.core.model_id, found["keypoints0"], found["keypoints1"], found["scores"],
            found["inliers"], found["index0"], found["index1"]))
        if step.overlay is not None:
            self.publish_debug(step.overlay, msg.header)


def main(args=None) -> int:
    return run_node(LightGlueNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
