"""The launch file itself: run by launch_testing where it is installed (a full ROS 2
install); the PyPI ROS 2 wheels have no launch/launch_ros, so it skips there. The node
executables are tested directly with the same parameters file in the node tests."""
import ast
import shutil
import subprocess
import sys

import pytest

from ros_helpers import REPO_ROOT

LAUNCH_FILE = REPO_ROOT / "launch" / "matcher.launch.py"
LAUNCH_TEST = REPO_ROOT / "test" / "launch" / "matcher_launch_testing.py"


def test_launch_file_declares_the_documented_arguments():
    tree = ast.parse(LAUNCH_FILE.read_text())
    declared = {node.args[0].value for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DeclareLaunchArgument"}
    assert {"image_topic", "namespace", "params_file", "device", "use_compressed", "debug_images",
            "detector", "matcher"} <= declared


def test_matcher_launch_with_launch_testing():
    pytest.importorskip("launch_testing", reason="launch_testing not installed (full ROS 2 installs have it; "
                                                 "the PyPI wheels used by scripts/setup_env.sh do not)")
    pytest.importorskip("launch_ros", reason="launch_ros not installed")
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    try:
        get_package_share_directory("kp_ros")
    except PackageNotFoundError:
        pytest.skip("kp_ros is not installed in an ament prefix (colcon build && source install/setup.bash)")
    launch_test = shutil.which("launch_test")
    cmd = [launch_test] if launch_test else [sys.executable, "-m", "launch_testing.launch_test"]
    result = subprocess.run(cmd + [str(LAUNCH_TEST)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
