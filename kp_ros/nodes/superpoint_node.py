"""superpoint_node: SuperPoint keypoints and descriptors for every camera frame.

Subscribes ``image`` (or ``image/compressed``), publishes ``keypoints``
(kp_ros/Keypoints, header copied from the image) and ``~/debug_image``.
"""
from __future__ import annotations

from kp_ros.core import models
from kp_ros.core.pipeline import FeaturePipeline
from kp_ros.msg import Keypoints
from kp_ros.ros.conversions import keypoints_to_msg
from kp_ros.ros.feature_node import FeatureNode
from kp_ros.ros.node_base import run_node
from kp_ros.ros.qos import output_qos


class SuperPointNode(FeatureNode):
    MODEL = models.model("superpoint")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._pub = self.create_publisher(Keypoints, "keypoints", output_qos())
        self.pipeline = FeaturePipeline(detector=self.core)

    def core_extras(self) -> dict:
        # A node shares the cores with other processes (the other kp_ros nodes): small ops
        # single-threaded, see kp_ros/core/threads.py.
        return {"one_thread_small_ops": True}

    def process(self, bundle, images) -> None:
        image, header = images[0], bundle.header
        found = self.pipeline.detect(image, overlay=self.debug_wanted())
        height, width = image.shape[:2]
        self._pub.publish(keypoints_to_msg(header, height, width, self.core.model_id,
                                           found.keypoints, found.scores, found.descriptors))
        if found.overlay is not None:
            self.publish_debug(found.overlay, header)


def main(args=None) -> int:
    return run_node(SuperPointNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
