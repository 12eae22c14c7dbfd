"""ros2 launch kp_ros matcher.launch.py image_topic:=/camera/image_raw

Starts superpoint_node and a matcher (eloftr_node, or lightglue_node with matcher:=lightglue)
on one camera topic, configured by
config/matcher.yaml. Two cameras: two launches with different ``namespace``.

With the defaults the nodes talk to any ROS 2 process on the default DDS transports
(a camera driver, ``ros2 bag play``, ``ros2 topic``), and their image subscription
follows the publishers' reliability (reliable_input: auto). When a node exits with an
error the whole launch shuts down and ``ros2 launch`` exits non-zero, unless
``respawn:=true`` restarts it instead.
"""
import os
import sys

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler,
                            SetEnvironmentVariable, Shutdown)
from launch.conditions import IfCondition
from launch.event_handlers import OnProcessExit
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node

from kp_ros.core import models
from kp_ros.core.topics import camera_info_topic

TRUE = ("true", "1", "yes", "on")


class NodeFailed(RuntimeError):
    """Raised from the exit handler: launch then logs it, shuts down and returns 1."""


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
        *(DeclareLaunchArgument(f"{entry.name}_model", default_value="",
                                description=f"{entry.title} hub id or local directory (empty: "
                                            f"from params_file).") for entry in models.MODELS.values()),
        DeclareLaunchArgument("device", default_value="auto", description="auto | cpu | cuda | cuda:N"),
        DeclareLaunchArgument("use_compressed", default_value="false",
                              description="Subscribe to sensor_msgs/CompressedImage."),
        DeclareLaunchArgument("debug_images", default_value="false",
                              description="Always publish ~/debug_image overlays."),
        DeclareLaunchArgument("detector", default_value="true", description="Run superpoint_node."),
        DeclareLaunchArgument("matcher", default_value="eloftr",
                              description="eloftr (eloftr_node, dense, on the images; true means "
                                          "this) | lightglue (lightglue_node, sparse, on "
                                          "superpoint_node's keypoints) | false (no matcher)."),
        DeclareLaunchArgument("tracker", default_value="true",
                              description="Run track_node (kp_ros/Tracks from keypoints + matches)."),
        DeclareLaunchArgument("respawn", default_value="false",
                              description="Restart a node that exits (after respawn_delay s) "
                                          "instead of shutting the launch down."),
        DeclareLaunchArgument("respawn_delay", default_value="2.0",
                              description="Seconds before a respawn."),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="All nodes follow /clock (ros2 bag play --clock, "
                                          "replay_bag --clock, a simulator): stamps, latencies "
                                          "and diagnostics on the recorded time line."),
        DeclareLaunchArgument(
            "large_data", default_value="false",
            description="Opt-in: Fast DDS LARGE_DATA transports (shared memory/TCP for data, UDP "
                        "discovery), lower latency for full frames. Every other participant "
                        "(camera driver, ros2 CLI, bag player, other machines) must then set "
                        "FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA too: processes with different "
                        "transports do not discover each other. Ignored if "
                        "FASTDDS_BUILTIN_TRANSPORTS is set."),
    ]
    # The user's own FASTDDS_BUILTIN_TRANSPORTS, if any, wins.
    transports = SetEnvironmentVariable(
        "FASTDDS_BUILTIN_TRANSPORTS",
        EnvironmentVariable("FASTDDS_BUILTIN_TRANSPORTS", default_value="LARGE_DATA"),
        condition=IfCondition(LaunchConfiguration("large_data")))
    return LaunchDescription(args + [transports, OpaqueFunction(function=feature_nodes)])


def feature_nodes(context):
    """The nodes, built once the arguments are known (an empty model argument must leave
    the params file's model alone, which a plain substitution cannot express)."""
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    image_topic = arg("image_topic")
    respawn = arg("respawn").lower() in TRUE
    debug_image = arg("debug_images").lower() in TRUE
    use_sim_time = arg("use_sim_time").lower() in TRUE
    actions = []

    def add(executable, overrides, remappings):
        node = Node(package="kp_ros", executable=executable, name=executable,
                    namespace=arg("namespace"),
                    parameters=[arg("params_file"), overrides, {"use_sim_time": use_sim_time}],
                    remappings=remappings, output="screen",
                    # Colour codes only where a person reads a terminal, not in redirected logs.
                    emulate_tty=sys.stdout.isatty(),
                    respawn=respawn, respawn_delay=float(arg("respawn_delay")),
                    # After Ctrl-C a node finishes its frame in progress (seconds for
                    # EfficientLoFTR on a CPU) and logs its counters: launch's default 5 s
                    # before SIGTERM cuts that short on a loaded machine.
                    sigterm_timeout="30")
        actions.append(node)
        if not respawn:
            actions.append(RegisterEventHandler(OnProcessExit(target_action=node, on_exit=on_node_exit)))

    # camera_info is the image topic's sibling (image_pipeline's convention), for eloftr_node's
    # geometric_verification: essential.
    images = [("image", image_topic), ("image/compressed", image_topic + "/compressed"),
              ("camera_info", camera_info_topic(image_topic))]
    common = {"device": arg("device"), "use_compressed": arg("use_compressed").lower() in TRUE,
              "debug_image": debug_image}
    if arg("detector").lower() in TRUE:
        for entry in models.of_kind("detector"):
            add(entry.node, dict(common, **model_override(arg, entry)), images)
    entry = matcher_entry(arg("matcher"))
    if entry is not None and entry.consumes == "keypoints":
        # Reads keypoints (same namespace); the image only for its overlay.
        add(entry.node, {"device": arg("device"), "debug_image": debug_image,
                         **model_override(arg, entry)}, images[:1] + images[2:])
    elif entry is not None:
        add(entry.node, dict(common, **model_override(arg, entry)), images)
    if arg("tracker").lower() in TRUE:
        # Not a model node: only the params file and the debug switch apply; the image is
        # remapped too, for its debug overlay.
        add("track_node", {"debug_image": debug_image}, [("image", image_topic)])
    return actions


def model_override(arg, entry) -> dict:
    """The entry's ``<name>_model`` launch argument, when given (else the params file's)."""
    value = arg(f"{entry.name}_model")
    return {"model": value} if value else {}


def matcher_entry(choice: str):
    """The matcher argument -> its MODELS entry (true: eloftr; false: None), or ValueError."""
    choice = choice.strip().lower()
    if choice in TRUE:
        choice = "eloftr"
    if choice in ("false", "0", "no", "off", "none", ""):
        return None
    names = [entry.name for entry in models.of_kind("matcher")]
    if choice not in names:
        raise ValueError(f"matcher:={choice}: use {', '.join(names)} or false")
    return models.model(choice)


def on_node_exit(event, context):
    """A node that stops takes the launch down; one that failed also makes ros2 launch
    exit non-zero (launch returns 1 when an event handler raises)."""
    if event.returncode not in (0, None) and not context.is_shutdown:
        raise NodeFailed(f"{event.action.node_name} exited with code {event.returncode}: "
                         f"shutting down (see its log lines above)")
    return [Shutdown(reason=f"{event.action.node_name} exited")]
