"""The launch file itself, run by launch_testing (a ROS 2 install, or the venv of
scripts/setup_env.sh, which installs it from ../shared/ros2-cli; it skips with the reason
where neither is there). test_ros2_cli.py drives it with the real ros2 CLI."""
import shutil
import subprocess
import sys

from ros_helpers import REPO_ROOT, require_launch_and_installed_kp_ros

LAUNCH_FILE = REPO_ROOT / "launch" / "matcher.launch.py"
LAUNCH_TEST = REPO_ROOT / "test" / "launch" / "matcher_launch_testing.py"


def test_launch_file_declares_the_documented_arguments():
    require_launch_and_installed_kp_ros()
    import importlib.util
    from launch.actions import DeclareLaunchArgument

    spec = importlib.util.spec_from_file_location("matcher_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    declared = {entity.name for entity in module.generate_launch_description().entities
                if isinstance(entity, DeclareLaunchArgument)}
    assert {"image_topic", "namespace", "params_file", "device", "use_compressed", "debug_images",
            "detector", "matcher", "tracker", "superpoint_model", "eloftr_model", "respawn",
            "large_data", "use_sim_time"} <= declared


def test_matcher_launch_with_launch_testing():
    require_launch_and_installed_kp_ros()
    launch_test = shutil.which("launch_test")
    cmd = [launch_test] if launch_test else [sys.executable, "-m", "launch_testing.launch_test"]
    result = subprocess.run(cmd + [str(LAUNCH_TEST)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
