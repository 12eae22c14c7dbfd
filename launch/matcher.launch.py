"""ros2 launch kp_ros matcher.launch.py image_topic:=/camera/image_raw

Starts frontend_node (default ``frontend:=true``): detection, matching (eloftr, or lightglue /
superglue with matcher:=lightglue|superglue) and tracks of each frame in one process, so tracks link whatever
the load. ``stereo:=true`` (implies the front-end) takes a rectified pair on
``left_image_topic`` / ``right_image_topic`` and their camera_info siblings.
``vins:=true`` (= fusion) or ``vins:=mono`` also publishes the feature cloud VINS-Fusion /
VINS-Mono subscribe to, on ``vins_topic``. ``frontend:=false`` runs the separate nodes
instead (superpoint_node, a matcher node, track_node; ``detector`` / ``matcher`` /
``tracker`` pick them). Configured by config/matcher.yaml. Two cameras: two launches with
different ``namespace``.

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
FALSE = ("false", "0", "no", "off", "none", "")
VINS_TOPIC = "/feature_tracker/feature"  # VINS-Fusion's and VINS-Mono's feature subscription


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
                              description="eloftr (dense, on the images; true means this) | "
                                          "lightglue | superglue (sparse, on SuperPoint's "
                                          "keypoints) | false (no matcher; frontend:=false only)."),
        DeclareLaunchArgument("tracker", default_value="true",
                              description="Run track_node (kp_ros/Tracks from keypoints + matches)."),
        DeclareLaunchArgument("frontend", default_value="true",
                              description="true: one frontend_node (detection, matches and tracks "
                                          "of each frame in one process: tracks link under "
                                          "load); false: the separate nodes (detector, matcher, "
                                          "tracker arguments)."),
        DeclareLaunchArgument("stereo", default_value="false",
                              description="A rectified stereo pair (left_image_topic, "
                                          "right_image_topic and their camera_info): left-right "
                                          "matches, disparity, depth per track. Implies "
                                          "frontend:=true."),
        DeclareLaunchArgument("left_image_topic", default_value="/camera/left/image_rect",
                              description="Stereo: the left rectified image (camera_info beside it)."),
        DeclareLaunchArgument("right_image_topic", default_value="/camera/right/image_rect",
                              description="Stereo: the right rectified image (camera_info beside it)."),
        DeclareLaunchArgument("vins", default_value="false",
                              description="false | true (= fusion) | fusion | mono: publish the "
                                          "sensor_msgs/PointCloud feature cloud VINS-Fusion / "
                                          "VINS-Mono read (vins_layout), on vins_topic."),
        DeclareLaunchArgument("vins_topic", default_value=VINS_TOPIC,
                              description="Where the feature cloud goes (VINS-Fusion and VINS-Mono "
                                          "subscribe to /feature_tracker/feature)."),
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

    respawn = arg("respawn").lower() in TRUE
    use_sim_time = arg("use_sim_time").lower() in TRUE
    actions = []
    for executable, overrides, remappings in plan(arg):
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
    return actions


def plan(arg) -> list[tuple[str, dict, list]]:
    """(executable, parameter overrides, remappings) of each node, from ``arg(name)`` (a
    launch argument's value); ValueError for a combination that cannot run."""
    image_topic = arg("image_topic")
    debug_image = arg("debug_images").lower() in TRUE
    nodes = []
    # camera_info is the image topic's sibling (image_pipeline's convention), for eloftr_node's
    # geometric_verification: essential.
    images = image_remappings("image", image_topic)
    common = {"device": arg("device"), "use_compressed": arg("use_compressed").lower() in TRUE,
              "debug_image": debug_image}
    stereo = arg("stereo").lower() in TRUE
    vins = vins_layout(arg("vins"))
    vins_remap = [("~/feature", arg("vins_topic"))] if vins != "none" else []
    vins_param = {"vins_layout": vins} if vins != "none" else {}
    if stereo or arg("frontend").lower() in TRUE:
        entry = matcher_entry(arg("matcher"))
        if entry is None:
            raise ValueError("the front-end needs a matcher: matcher:=eloftr, lightglue or superglue "
                             "(frontend:=false runs the separate nodes without one)")
        if stereo:
            remappings = image_remappings("left/image_rect", arg("left_image_topic"), "left/") \
                + image_remappings("right/image_rect", arg("right_image_topic"), "right/")
        else:
            remappings = images
        models_given = {f"{e.name}_model": v for e in models.MODELS.values()
                        for v in [arg(f"{e.name}_model")] if v}
        return [("frontend_node", dict(common, matcher=entry.name, stereo=stereo, **models_given,
                                       **vins_param), remappings + vins_remap)]
    if arg("detector").lower() in TRUE:
        for entry in models.of_kind("detector"):
            nodes.append((entry.node, dict(common, **model_override(arg, entry)), images))
    entry = matcher_entry(arg("matcher"))
    if entry is not None and entry.consumes == "keypoints":
        # Reads keypoints (same namespace); the image only for its overlay.
        nodes.append((entry.node, {"device": arg("device"), "debug_image": debug_image,
                                   **model_override(arg, entry)}, images[:1] + images[2:]))
    elif entry is not None:
        nodes.append((entry.node, dict(common, **model_override(arg, entry)), images))
    if arg("tracker").lower() in TRUE:
        # Not a model node: only the params file and the debug switch apply; the image is
        # remapped too, for its debug overlay, and camera_info for the feature cloud.
        nodes.append(("track_node", {"debug_image": debug_image, **vins_param},
                      [("image", image_topic)] + ([images[2]] if vins_param else []) + vins_remap))
    elif vins_param:
        raise ValueError("vins:= needs the tracks: tracker:=true (or frontend:=true)")
    return nodes


def image_remappings(name: str, topic: str, prefix: str = "") -> list[tuple[str, str]]:
    """A node's relative image name (and its compressed and camera_info siblings) to ``topic``."""
    return [(name, topic), (f"{name}/compressed", topic + "/compressed"),
            (f"{prefix}camera_info", camera_info_topic(topic))]


def vins_layout(choice: str) -> str:
    """The vins argument -> vins_layout: none, fusion (true) or mono; ValueError otherwise."""
    choice = choice.strip().lower()
    if choice in FALSE:
        return "none"
    if choice in TRUE:
        return "fusion"
    if choice not in ("fusion", "mono"):
        raise ValueError(f"vins:={choice}: use false, true (= fusion), fusion or mono")
    return choice


def model_override(arg, entry) -> dict:
    """The entry's ``<name>_model`` launch argument, when given (else the params file's)."""
    value = arg(f"{entry.name}_model")
    return {"model": value} if value else {}


def matcher_entry(choice: str):
    """The matcher argument -> its MODELS entry (true: eloftr; false: None), or ValueError."""
    choice = choice.strip().lower()
    if choice in TRUE:
        choice = "eloftr"
    if choice in FALSE:
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
