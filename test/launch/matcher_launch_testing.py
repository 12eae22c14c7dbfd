"""launch_testing test of launch/matcher.launch.py (run by test/test_launch.py wherever
launch_testing is installed, i.e. a full ROS 2 install with kp_ros built and sourced).

Brings up the default front-end through the real launch file, with tiny random-init
models written to a temporary parameters file, feeds frames and checks its outputs
arrive (Keypoints, Matches and Tracks of each frame, as the separate nodes publish them)."""
import os
import tempfile
import time
import unittest

import launch_testing
import launch_testing.actions
import launch_testing.asserts
import numpy as np
import pytest
import rclpy
import yaml
from ament_index_python.packages import get_package_share_directory
from builtin_interfaces.msg import Time
from launch import LaunchDescription
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from sensor_msgs.msg import Image

from kp_ros.core.random_init import save_random_eloftr, save_random_superpoint
from kp_ros.msg import Keypoints, Matches, Tracks
from kp_ros.ros.conversions import array_to_image_msg
from kp_ros.ros.qos import output_qos

SHARE = get_package_share_directory("kp_ros")


@pytest.mark.launch_test
def generate_test_description():
    tmp = tempfile.mkdtemp(prefix="kp_ros_launch_test_")
    params = yaml.safe_load(open(os.path.join(SHARE, "config", "matcher.yaml")))
    params["/**/frontend_node"]["ros__parameters"]["superpoint_model"] = str(
        save_random_superpoint(os.path.join(tmp, "sp"), "tiny"))
    params["/**/frontend_node"]["ros__parameters"]["eloftr_model"] = str(
        save_random_eloftr(os.path.join(tmp, "eloftr"), "tiny"))
    params_file = os.path.join(tmp, "params.yaml")
    yaml.safe_dump(params, open(params_file, "w"))
    launch = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(SHARE, "launch", "matcher.launch.py")),
        launch_arguments={"image_topic": "/launch_test/image_raw", "namespace": "cam0",
                          "params_file": params_file, "device": "cpu"}.items())
    return LaunchDescription([launch, launch_testing.actions.ReadyToTest()])


class TestMatcherLaunch(unittest.TestCase):
    def test_both_outputs_arrive_with_the_frames_stamps(self):
        rclpy.init()
        node = rclpy.create_node("launch_test_driver")
        try:
            got = {"keypoints": [], "matches": [], "tracks": []}
            node.create_subscription(Tracks, "/cam0/tracks", got["tracks"].append, output_qos())
            node.create_subscription(Keypoints, "/cam0/keypoints", got["keypoints"].append, output_qos())
            node.create_subscription(Matches, "/cam0/matches", got["matches"].append, output_qos())
            pub = node.create_publisher(Image, "/launch_test/image_raw", output_qos())
            deadline = time.monotonic() + 120
            while pub.get_subscription_count() < 1 and time.monotonic() < deadline:
                rclpy.spin_once(node, timeout_sec=0.1)
            rng = np.random.default_rng(0)
            base = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
            for i in range(3):
                msg = array_to_image_msg(np.ascontiguousarray(base[2 * i:2 * i + 120, i:i + 160]))
                msg.header.stamp = Time(sec=10 + i)
                pub.publish(msg)
                end = time.monotonic() + 30
                while time.monotonic() < end and not any(k.header.stamp.sec == 10 + i for k in got["keypoints"]):
                    rclpy.spin_once(node, timeout_sec=0.1)
            end = time.monotonic() + 60
            while time.monotonic() < end and len(got["matches"]) < 2:
                rclpy.spin_once(node, timeout_sec=0.1)
            self.assertEqual(sorted(k.header.stamp.sec for k in got["keypoints"]), [10, 11, 12])
            self.assertEqual([(m.stamp0.sec, m.header.stamp.sec) for m in got["matches"]], [(10, 11), (11, 12)])
            end = time.monotonic() + 30  # one Tracks per Keypoints frame
            while time.monotonic() < end and len(got["tracks"]) < 3:
                rclpy.spin_once(node, timeout_sec=0.1)
            self.assertEqual([t.header.stamp.sec for t in got["tracks"]], [10, 11, 12])
            for tracks, keypoints in zip(got["tracks"], sorted(got["keypoints"], key=lambda k: k.header.stamp.sec)):
                self.assertEqual(list(tracks.x), list(keypoints.x))
        finally:
            node.destroy_node()
            rclpy.shutdown()


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_clean_exit(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)
