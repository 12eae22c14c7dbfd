"""Warm-up at node start: two dummy frames on CUDA before the subscription, skipped on CPU;
the CUDA branch runs here on CPU with a fake device flag."""
from __future__ import annotations

import numpy as np
import pytest
import rclpy
import torch

from kp_ros.core import warmup
from kp_ros.core.warmup import WARM_UP_FRAMES, describe_warm_up, warm_up


def test_cpu_skips_and_cuda_runs_two_dummy_frames():
    calls = []
    assert warm_up(calls.append, torch.device("cpu")) is None and calls == []
    seconds = warm_up(calls.append, torch.device("cuda:1"))  # nothing runs on a device here
    assert len(calls) == WARM_UP_FRAMES == 2 and seconds >= 0
    assert calls[0].shape == (480, 640, 3) and calls[0].dtype == np.uint8 and calls[0].std() > 50
    assert describe_warm_up(None) == ""
    assert describe_warm_up(1.234) == "; warm-up 2 frames in 1.23 s"


@pytest.mark.parametrize("node", ["superpoint_node", "eloftr_node"])
def test_node_warms_up_before_it_subscribes_and_says_so(node, tiny_superpoint_dir, tiny_eloftr_dir,
                                                        monkeypatch):
    from kp_ros.msg import Keypoints, Matches
    from kp_ros.nodes import eloftr_node, superpoint_node
    from ros_helpers import InProcessNode
    monkeypatch.setattr(warmup, "needs_warm_up", lambda device: True)  # the fake CUDA flag
    from kp_ros.ros.feature_node import FeatureNode
    node_class, output, topic, model = {
        "superpoint_node": (superpoint_node.SuperPointNode, Keypoints, "keypoints", tiny_superpoint_dir),
        "eloftr_node": (eloftr_node.EfficientLoFTRNode, Matches, "matches", tiny_eloftr_dir)}[node]
    seen, real_step = [], FeatureNode.warm_up_step

    def warm_up_step(self):
        step = real_step(self)  # the core's real call, recorded with the subscription state
        return lambda image: seen.append(self.input) or step(image)
    monkeypatch.setattr(FeatureNode, "warm_up_step", warm_up_step)
    harness = InProcessNode(node_class, "/warm_up", output, topic, {
        "model": str(model), "device": "cpu", "resize": "native"})
    try:
        assert seen == [None, None]
        assert harness.node.warm_up_seconds is not None
        assert harness.node.worker.snapshot().received == 0  # dummy frames are not counted
    finally:
        if rclpy.ok(context=harness.context):
            harness.close()


def test_node_on_cpu_does_not_warm_up(tiny_superpoint_dir):
    from kp_ros.msg import Keypoints
    from kp_ros.nodes import superpoint_node
    from ros_helpers import InProcessNode
    harness = InProcessNode(superpoint_node.SuperPointNode, "/no_warm_up", Keypoints, "keypoints", {
        "model": str(tiny_superpoint_dir), "device": "cpu"})
    try:
        assert harness.node.warm_up_seconds is None
    finally:
        harness.close()
