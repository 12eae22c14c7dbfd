"""superpoint_node: SuperPoint keypoints and descriptors for every camera frame.

Subscribes ``image`` (or ``image/compressed``), publishes ``keypoints``
(kp_ros/Keypoints, header copied from the image) and ``~/debug_image``.
"""
from __future__ import annotations

import warnings

from kp_ros.core import params
from kp_ros.core.precision import PrecisionWarning
from kp_ros.core.superpoint import SuperPointDetector
from kp_ros.core.pipeline import FeaturePipeline
from kp_ros.msg import Keypoints
from kp_ros.ros.conversions import keypoints_to_msg
from kp_ros.ros.feature_node import FeatureNode, ros_params, run_node
from kp_ros.ros.qos import output_qos


class SuperPointNode(FeatureNode):
    NODE_NAME = "superpoint_node"
    MODEL_PARAMS = ros_params(params.SUPERPOINT)

    def __init__(self, **kwargs):
        super().__init__(self.NODE_NAME, **kwargs)
        self._pub = self.create_publisher(Keypoints, "keypoints", output_qos())
        self.pipeline = FeaturePipeline(detector=self.core)

    def build_core(self, values: dict) -> SuperPointDetector:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)  # logged below as a ROS warning
            core = SuperPointDetector(
                values["model"], device=values["device"], keypoint_threshold=values["keypoint_threshold"],
                nms_radius=values["nms_radius"], max_keypoints=values["max_keypoints"],
                resize=values["resize"], fp16=values["fp16"], precision=values["precision"],
                # A node shares the cores with other processes (the other kp_ros nodes):
                # small ops single-threaded, see kp_ros/core/threads.py.
                one_thread_small_ops=True)
        if core.precision.warning:
            self.get_logger().warning(core.precision.warning)
        return core

    def apply_params(self, changes: dict) -> None:
        self.core.set_params(**{k: v for k, v in changes.items() if k in (
            "keypoint_threshold", "nms_radius", "max_keypoints", "resize")})

    def describe(self) -> str:
        return f"SuperPoint {self.core.model_id} on {self.core.device}, precision {self.core.precision.note}"

    def process(self, msg, image, arrival) -> None:
        found = self.pipeline.detect(image, overlay=self.debug_wanted())
        height, width = image.shape[:2]
        self._pub.publish(keypoints_to_msg(msg.header, height, width, self.core.model_id,
                                           found.keypoints, found.scores, found.descriptors))
        if found.overlay is not None:
            self.publish_debug(found.overlay, msg.header)


def main(args=None) -> int:
    return run_node(SuperPointNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
