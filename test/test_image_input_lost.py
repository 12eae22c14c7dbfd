"""kp_ros.ros.image_input: frames the middleware reports lost are counted (``lost``, shown
on /diagnostics), over re-subscriptions; the subscription offers the message-lost event."""
from types import SimpleNamespace

import pytest

pytest.importorskip("rclpy")
from ros_helpers import ros_node  # noqa: E402

from kp_ros.ros.image_input import ImageInput  # noqa: E402


def test_message_lost_events_are_counted():
    from sensor_msgs.msg import Image
    with ros_node("lost_counter") as (node, _):
        image_input = ImageInput(node, Image, "image", "best_effort", lambda msg: None)
        assert image_input.lost_counted  # rmw_fastrtps offers the event
        image_input._on_message_lost(SimpleNamespace(total_count=3, total_count_change=3))
        image_input._subscribe(True, "test: publishers changed")
        image_input._on_message_lost(SimpleNamespace(total_count=2, total_count_change=2))
        assert image_input.lost == 5
