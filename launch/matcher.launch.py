"""ros2 launch kp_ros matcher.launch.py image_topic:=/camera/image_raw

Starts superpoint_node and eloftr_node on one camera topic, configured by
config/matcher.yaml. Two cameras: two launches with different ``namespace``.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("kp_ros"), "config", "matcher.yaml")
    args = [
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw",
                              description="Camera image topic (sensor_msgs/Image); with "
                                          "use_compressed, <image_topic>/compressed is used."),
        DeclareLaunchArgument("namespace", default_value="",
                              description="Namespace of both nodes and their outputs."),
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="YAML with the parameters of both nodes."),
        DeclareLaunchArgument("device", default_value="auto", description="auto | cpu | cuda | cuda:N"),
        DeclareLaunchArgument("use_compressed", default_value="false",
                              description="Subscribe to sensor_msgs/CompressedImage."),
        DeclareLaunchArgument("debug_images", default_value="false",
                              description="Always publish ~/debug_image overlays."),
        DeclareLaunchArgument("detector", default_value="true", description="Run superpoint_node."),
        DeclareLaunchArgument("matcher", default_value="true", description="Run eloftr_node."),
        DeclareLaunchArgument(
            "large_data", default_value="true",
            description="Use Fast DDS LARGE_DATA transports (SHM/TCP for data, UDP discovery): "
                        "~5x lower latency for full frames on one machine, works across machines "
                        "with peers that use it too. Ignored if FASTDDS_BUILTIN_TRANSPORTS is set."),
    ]
    # The user's own FASTDDS_BUILTIN_TRANSPORTS, if any, wins.
    transports = SetEnvironmentVariable(
        "FASTDDS_BUILTIN_TRANSPORTS",
        EnvironmentVariable("FASTDDS_BUILTIN_TRANSPORTS", default_value="LARGE_DATA"),
        condition=IfCondition(LaunchConfiguration("large_data")))

    image_topic = LaunchConfiguration("image_topic")
    overrides = {
        "device": LaunchConfiguration("device"),
        "use_compressed": ParameterValue(LaunchConfiguration("use_compressed"), value_type=bool),
        "debug_image": ParameterValue(LaunchConfiguration("debug_images"), value_type=bool),
    }
    remappings = [("image", image_topic), ("image/compressed", [image_topic, "/compressed"])]

    def feature_node(executable, enabled):
        return Node(package="kp_ros", executable=executable, name=executable,
                    namespace=LaunchConfiguration("namespace"),
                    parameters=[LaunchConfiguration("params_file"), overrides],
                    remappings=remappings, output="screen", emulate_tty=True,
                    condition=IfCondition(LaunchConfiguration(enabled)))

    return LaunchDescription(args + [
        transports,
        feature_node("superpoint_node", "detector"),
        feature_node("eloftr_node", "matcher"),
    ])
