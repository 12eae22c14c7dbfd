"""eloftr_node: EfficientLoFTR matches between each frame and the previous one.

Subscribes ``image`` (or ``image/compressed``) and ``camera_info``, publishes ``matches``
(kp_ros/Matches: header of the newer frame, stamp0/frame_id0 of the older one) and
``~/debug_image``. "Previous" means the previously *processed* frame: frames dropped
by the keep-latest hand-off are skipped, not matched. Stamp gaps and backwards stamps
are judged between consecutive *received* frames, so a device slower than
``max_frame_gap`` per frame still matches the frames it gets to (it drops the rest).
"""
from __future__ import annotations

from kp_ros.core import models
from kp_ros.core.geometry import CalibrationGate, CameraInfoCache
from kp_ros.core.pipeline import FeaturePipeline
from kp_ros.msg import Matches
from kp_ros.ros.conversions import matches_to_msg
from kp_ros.ros.feature_node import FeatureNode
from kp_ros.ros.node_base import run_node
from kp_ros.ros.qos import output_qos


class EfficientLoFTRNode(FeatureNode):
    MODEL = models.model("eloftr")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._pub = self.create_publisher(Matches, "matches", output_qos())
        # Continuity, pairing and resets: see kp_ros/core/pipeline.py.
        self.pipeline = FeaturePipeline(matcher=self.core, max_frame_gap=self.values["max_frame_gap"])
        # Calibration for 'essential': camera_info beside the image, as image_pipeline nodes
        # take it (latched-style QoS not assumed: drivers publish it with every frame).
        self._camera_info = CameraInfoCache()
        self.calibration = CalibrationGate()  # used only where it fits the frames' size
        self._warned_no_camera = False

    def apply_node_params(self, changes: dict) -> None:
        if "max_frame_gap" in changes:
            self.pipeline.max_frame_gap = changes["max_frame_gap"]

    def on_camera_info(self, msg) -> None:
        if not self._camera_info.update(msg):
            return  # the same calibration with every frame (NaN included): nothing to do
        camera = self.calibration.camera = self._camera_info.camera
        if camera is None:
            self.get_logger().error(f"camera_info ignored: {self._camera_info.problem}")
            return
        self.get_logger().info(f"camera_info: {msg.width}x{msg.height}, {msg.distortion_model or 'plumb_bob'}, "
                               f"focal {camera.focal:.1f} px")

    def extra_diagnostics(self) -> dict:
        return {"stream resets": self.resets}

    @property
    def resets(self) -> int:
        return self.pipeline.resets

    def on_arrival(self, bundle) -> tuple[int, str | None]:
        return self.pipeline.arrive(bundle.stamp_ns)

    def process(self, bundle, images) -> None:
        self.core.camera, refused = self.calibration.for_image(images[0].shape[1], images[0].shape[0])
        if refused and self.core.params.geometric_verification == "essential":
            self.get_logger().warning(refused)
        if self.core.params.geometric_verification == "essential" and self.calibration.camera is None \
                and not self._warned_no_camera:
            self._warned_no_camera = True
            self.get_logger().warning(
                f"geometric_verification essential: no camera_info on {self.input.camera_info_topic} "
                f"yet; verifying with a fundamental matrix until one arrives")
        msg, image = bundle.msgs[0], images[0]
        encoding = getattr(msg, "encoding", None) or getattr(msg, "format", "")
        step = self.pipeline.match(image, bundle.stamp_ns, encoding, token=msg.header,
                                   arrival=bundle.arrival, overlay=self.debug_wanted())
        if step.reset:
            self.get_logger().warning(f"stream reset, no matches for this frame: {step.reset}")
        if step.matches is None:
            return
        height, width = image.shape[:2]
        found, header0 = step.matches, step.previous
        self._pub.publish(matches_to_msg(
            msg.header, header0.stamp, header0.frame_id, height, width, self.core.model_id,
            found["keypoints0"], found["keypoints1"], found["scores"], found["inliers"]))
        if step.overlay is not None:
            self.publish_debug(step.overlay, msg.header)

    def shutdown(self) -> None:
        super().shutdown()
        self.get_logger().info(f"stream resets: {self.resets}")


def main(args=None) -> int:
    return run_node(EfficientLoFTRNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
