"""The launch file itself, run by launch_testing (a ROS 2 install, or the venv of
scripts/setup_env.sh, which installs it from ../shared/ros2-cli; it skips with the reason
where neither is there). test_ros2_cli.py drives it with the real ros2 CLI."""
import shutil
import subprocess
import sys

from ros_helpers import REPO_ROOT, require_launch_and_installed_kp_ros

LAUNCH_FILE = REPO_ROOT / "launch" / "matcher.launch.py"
LAUNCH_TEST = REPO_ROOT / "test" / "launch" / "matcher_launch_testing.py"


def launch_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("matcher_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def defaults(module) -> dict:
    from launch.actions import DeclareLaunchArgument
    return {entity.name: "".join(s.text for s in entity.default_value or ())
            for entity in module.generate_launch_description().entities
            if isinstance(entity, DeclareLaunchArgument)}


def plan(**given):
    """The launch file's nodes for these arguments (the others at their defaults):
    {executable: (parameter overrides, remappings as a dict)}."""
    module = launch_module()
    args = {**defaults(module), **given}
    return {exe: (overrides, dict(remaps)) for exe, overrides, remaps in module.plan(args.__getitem__)}


def test_launch_file_declares_the_documented_arguments():
    require_launch_and_installed_kp_ros()
    declared = set(defaults(launch_module()))
    assert {"image_topic", "namespace", "params_file", "device", "use_compressed", "debug_images",
            "detector", "matcher", "tracker", "superpoint_model", "eloftr_model", "respawn",
            "large_data", "use_sim_time", "frontend", "stereo", "left_image_topic",
            "right_image_topic", "vins", "vins_topic"} <= declared


def test_default_is_the_one_process_front_end():
    require_launch_and_installed_kp_ros()
    nodes = plan(image_topic="/cam/image_raw", eloftr_model="/m/eloftr")
    assert list(nodes) == ["frontend_node"]
    overrides, remaps = nodes["frontend_node"]
    assert overrides["matcher"] == "eloftr" and overrides["stereo"] is False
    assert overrides["eloftr_model"] == "/m/eloftr" and "superpoint_model" not in overrides
    assert remaps == {"image": "/cam/image_raw", "image/compressed": "/cam/image_raw/compressed",
                      "camera_info": "/cam/camera_info"}
    assert "vins_layout" not in overrides and "~/feature" not in remaps


def test_stereo_and_vins_on_the_front_end():
    require_launch_and_installed_kp_ros()
    nodes = plan(stereo="true", frontend="false", vins="true")  # stereo implies the front-end
    overrides, remaps = nodes["frontend_node"]
    assert list(nodes) == ["frontend_node"] and overrides["stereo"] is True
    assert overrides["vins_layout"] == "fusion"
    assert remaps == {"left/image_rect": "/camera/left/image_rect",
                      "left/image_rect/compressed": "/camera/left/image_rect/compressed",
                      "left/camera_info": "/camera/left/camera_info",
                      "right/image_rect": "/camera/right/image_rect",
                      "right/image_rect/compressed": "/camera/right/image_rect/compressed",
                      "right/camera_info": "/camera/right/camera_info",
                      "~/feature": "/feature_tracker/feature"}
    mono = plan(vins="mono", vins_topic="/vins/feature", matcher="lightglue")["frontend_node"]
    assert mono[0]["vins_layout"] == "mono" and mono[0]["matcher"] == "lightglue"
    assert mono[1]["~/feature"] == "/vins/feature"


def test_separate_nodes_with_frontend_false():
    require_launch_and_installed_kp_ros()
    import pytest
    nodes = plan(frontend="false", image_topic="/cam/image_raw")
    assert list(nodes) == ["superpoint_node", "eloftr_node", "track_node"]
    assert "vins_layout" not in nodes["track_node"][0]
    nodes = plan(frontend="false", matcher="lightglue", detector="false", vins="true")
    assert list(nodes) == ["lightglue_node", "track_node"]
    assert nodes["track_node"][0]["vins_layout"] == "fusion"
    assert nodes["track_node"][1]["~/feature"] == "/feature_tracker/feature"
    assert nodes["track_node"][1]["camera_info"] == "/camera/camera_info"
    with pytest.raises(ValueError, match="vins:=maybe"):
        plan(vins="maybe")
    with pytest.raises(ValueError, match="needs a matcher"):
        plan(matcher="false")
    with pytest.raises(ValueError, match="needs the tracks"):
        plan(frontend="false", tracker="false", vins="mono")


def test_matcher_launch_with_launch_testing():
    require_launch_and_installed_kp_ros()
    launch_test = shutil.which("launch_test")
    cmd = [launch_test] if launch_test else [sys.executable, "-m", "launch_testing.launch_test"]
    result = subprocess.run(cmd + [str(LAUNCH_TEST)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
