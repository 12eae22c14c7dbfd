"""superglue_node: SuperGlue matches between each Keypoints frame and the previous one.

lightglue_node with SuperGlue's weights and settings (kp_ros/core/superglue.py): the same
input (``keypoints``, ``camera_info``; ``image`` only for ``~/debug_image``), output
(``matches`` with ``index0`` / ``index1``), stream rules and accounting.
"""
from __future__ import annotations

from kp_ros.core import models
from kp_ros.nodes.lightglue_node import LightGlueNode
from kp_ros.ros.node_base import run_node


class SuperGlueNode(LightGlueNode):
    """lightglue_node's shell around the SuperGlue core."""
    MODEL = models.model("superglue")


def main(args=None) -> int:
    return run_node(SuperGlueNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
