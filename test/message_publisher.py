"""A separate OS process for test_message_transport: publishes deterministic Keypoints and
Matches (N given on the command line) once a subscriber is there, then waits for stdin
to close."""
import sys
import time

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Header

from kp_ros.msg import Keypoints, Matches
from kp_ros.ros.conversions import keypoints_to_msg, matches_to_msg

QOS = QoSProfile(depth=4, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def arrays(n: int, seed: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "kp": rng.random((n, 2), dtype=np.float32) * 640, "scores": rng.random(n, dtype=np.float32),
        "desc": rng.standard_normal((n, 256), dtype=np.float32),
        "kp1": rng.random((n, 2), dtype=np.float32) * 480, "inliers": rng.integers(0, 2, n).astype(np.uint8),
    }


def main() -> None:
    counts = [int(n) for n in sys.argv[1:]]
    rclpy.init()
    node = rclpy.create_node("message_publisher")
    kp_pub = node.create_publisher(Keypoints, "test_keypoints", QOS)
    m_pub = node.create_publisher(Matches, "test_matches", QOS)
    deadline = time.monotonic() + 30
    while (kp_pub.get_subscription_count() < 1 or m_pub.get_subscription_count() < 1) \
            and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    for i, n in enumerate(counts):
        a = arrays(n)
        header = Header(stamp=Time(sec=1341847980 + i, nanosec=722988000), frame_id=f"camera_{i}")
        kp_pub.publish(keypoints_to_msg(header, 480, 640, "superpoint-test", a["kp"], a["scores"], a["desc"]))
        m_pub.publish(matches_to_msg(header, Time(sec=1341847979 + i, nanosec=5), f"prev_{i}", 480, 640,
                                     "eloftr-test", a["kp"], a["kp1"], a["scores"], a["inliers"]))
    print("published", flush=True)
    sys.stdin.read()  # keep the writer (and its transient-local history) alive until the test is done
    node.destroy_node()
    rclpy.shutdown()


if __name__ == "__main__":
    main()
