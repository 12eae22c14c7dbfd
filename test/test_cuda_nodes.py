"""The nodes on CUDA, in-process: the warm-up runs before the subscription and is reported in
the start-up line with its time, and real frames are processed and published from the GPU.
Needs CUDA (skips without); scripts/gpu_check runs it, and the nodes as processes too."""
from __future__ import annotations

import re

import pytest
import rclpy
import torch
from conftest import synthetic_frame

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)")

WARM_UP_LINE = re.compile(r"on cuda(:\d+)?, precision .*; warm-up 2 frames in ([0-9.]+) s")


def node_spec(node, tiny_superpoint_dir, tiny_eloftr_dir):
    from kp_ros.msg import Keypoints, Matches
    from kp_ros.nodes import eloftr_node, superpoint_node
    return {"superpoint_node": (superpoint_node.SuperPointNode, Keypoints, "keypoints", tiny_superpoint_dir),
            "eloftr_node": (eloftr_node.EfficientLoFTRNode, Matches, "matches", tiny_eloftr_dir)}[node]


@pytest.mark.parametrize("precision", ["fp32", "auto"])
@pytest.mark.parametrize("node", ["superpoint_node", "eloftr_node"])
def test_node_on_cuda_warms_up_says_so_and_processes_frames(node, precision, tiny_superpoint_dir,
                                                            tiny_eloftr_dir, capfd):
    from ros_helpers import InProcessNode
    node_class, output_type, topic, model = node_spec(node, tiny_superpoint_dir, tiny_eloftr_dir)
    harness = InProcessNode(node_class, "/cuda_nodes", output_type, topic, {
        "model": str(model), "device": "cuda", "precision": precision, "match_threshold": 0.0}
        if node == "eloftr_node" else {"model": str(model), "device": "cuda", "precision": precision})
    try:
        core = harness.node.core
        assert core.device.type == "cuda"
        assert harness.node.warm_up_seconds is not None and harness.node.warm_up_seconds > 0
        assert harness.node.worker.snapshot().received == 0  # the dummy frames are not counted
        if precision == "auto":  # fp16 from sm 7.0 (tensor cores), else fp32
            expected = "fp16" if torch.cuda.get_device_capability(core.device) >= (7, 0) else "fp32"
            assert core.precision.name == expected, core.precision.note
        harness.node.announce()  # the start-up line, as run_node logs it
        frames = [synthetic_frame(240, 320, seed=4, shift=(8 * i, 0)) for i in range(3)]
        sent = [harness.submit(frame, 10.0 + 0.1 * i) for i, frame in enumerate(frames)]
        outputs = [harness.output_for(msg, timeout=30.0) for msg in sent]
        counts = harness.node.worker.snapshot()
        assert counts.processed == 3 and counts.rejected == 0, counts
        wanted = outputs if node == "superpoint_node" else outputs[1:]  # a pair needs two frames
        assert all(message is not None for message in wanted), outputs
    finally:
        if rclpy.ok(context=harness.context):
            harness.close()
    output = "".join(capfd.readouterr())
    match = WARM_UP_LINE.search(output)
    assert match and float(match.group(2)) > 0, output[-2000:]
    assert "Traceback" not in output
