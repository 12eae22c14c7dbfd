"""kp_ros/ros/stereo_input.py in a real rclpy node: image_pipeline's relative topic names,
left/right pairing into FrameBundles with both CameraInfos, rejects, pairing counters."""
from __future__ import annotations

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")


@pytest.fixture
def node():
    from rclpy.node import Node
    rclpy.init()
    made = Node("stereo_input_test", namespace="/stereo")
    yield made
    made.destroy_node()
    rclpy.shutdown()


def image(stamp_ns: int, frame_id: str):
    from kp_ros.ros.conversions import array_to_image_msg
    msg = array_to_image_msg(np.zeros((8, 8), np.uint8), "mono8")
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    msg.header.frame_id = frame_id
    return msg


def test_pairs_by_stamp_with_both_camera_infos(node):
    from sensor_msgs.msg import CameraInfo

    from kp_ros.ros.stereo_input import StereoInput
    bundles, rejects = [], []
    stereo = StereoInput(node, bundles.append, lambda msg, why: rejects.append(why),
                         use_compressed=False, reliability="reliable")
    assert stereo.topic == "/stereo/left/image_rect + /stereo/right/image_rect"
    left_info, right_info = CameraInfo(), CameraInfo()
    stereo._on_info("left", left_info)
    stereo._on_info("right", right_info)
    stereo.on_image("left", image(1_000_000_000, "l"))
    stereo.on_image("right", image(1_000_000_000, "r"))
    stereo.on_image("left", image(1_100_000_000, "l"))  # its right frame never comes
    stereo.on_image("right", image(1_200_000_000, "r"))
    stereo.on_image("left", image(1_200_000_000, "l"))
    bad = image(1_300_000_000, "r")
    bad.step = 1
    stereo.on_image("right", bad)
    assert [b.stamp_ns for b in bundles] == [1_000_000_000, 1_200_000_000]
    assert [m.header.frame_id for m in bundles[0].msgs] == ["l", "r"]
    assert bundles[0].infos[0] is left_info and bundles[0].infos[1] is right_info
    assert len(rejects) == 1 and rejects[0].startswith("right: ")
    counters = stereo.counters
    assert counters["pairs"] == 2 and counters["left_received"] == 3
    assert counters["left_dropped_unpaired"] == 1 and counters["right_received"] == 2


def test_compressed_variant_names(node):
    from kp_ros.ros.stereo_input import StereoInput
    stereo = StereoInput(node, print, print, use_compressed=True, reliability="auto")
    assert stereo.images["right"].topic == "/stereo/right/image_rect/compressed"
