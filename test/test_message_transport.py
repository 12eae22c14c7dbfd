"""Keypoints and Matches travel between two OS processes over DDS bit-identically."""
import subprocess
import sys

import numpy as np
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from kp_ros.msg import Keypoints, Matches
from kp_ros.ros.conversions import keypoints_from_msg, matches_from_msg
from message_publisher import arrays
from ros_helpers import REPO_ROOT, node_env, ros_node, spin_until

QOS = QoSProfile(depth=4, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def test_keypoints_and_matches_cross_processes_bit_identical():
    counts = [2000, 0]
    publisher = subprocess.Popen([sys.executable, str(REPO_ROOT / "test" / "message_publisher.py"),
                                  *map(str, counts)], env=node_env(), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    got_kp, got_m = [], []
    try:
        with ros_node("message_receiver") as (node, executor):
            node.create_subscription(Keypoints, "test_keypoints", got_kp.append, QOS)
            node.create_subscription(Matches, "test_matches", got_m.append, QOS)
            assert spin_until(executor, lambda: len(got_kp) == 2 and len(got_m) == 2, 60), \
                f"received {len(got_kp)} Keypoints, {len(got_m)} Matches"
    finally:
        out, _ = publisher.communicate(input="", timeout=30)
    assert publisher.returncode == 0, out

    for i, (kp_msg, m_msg, n) in enumerate(zip(got_kp, got_m, counts)):
        want = arrays(n)
        assert (kp_msg.header.stamp.sec, kp_msg.header.stamp.nanosec) == (1341847980 + i, 722988000)
        assert kp_msg.header.frame_id == f"camera_{i}"
        assert (kp_msg.height, kp_msg.width, kp_msg.detector) == (480, 640, "superpoint-test")
        kp = keypoints_from_msg(kp_msg)
        assert kp["keypoints"].tobytes() == want["kp"].tobytes()
        assert kp["scores"].tobytes() == want["scores"].tobytes()
        assert kp["descriptors"].shape == (n, 256) and kp_msg.descriptor_size == 256
        assert kp["descriptors"].tobytes() == want["desc"].tobytes()

        assert m_msg.header == kp_msg.header
        assert (m_msg.stamp0.sec, m_msg.stamp0.nanosec, m_msg.frame_id0) == (1341847979 + i, 5, f"prev_{i}")
        m = matches_from_msg(m_msg)
        assert m["keypoints0"].tobytes() == want["kp"].tobytes()
        assert m["keypoints1"].tobytes() == want["kp1"].tobytes()
        assert m["scores"].tobytes() == want["scores"].tobytes()
        assert np.array_equal(m["inliers"], want["inliers"])
