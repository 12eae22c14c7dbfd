"""The real ROS 2 command line against kp_ros, as a user would drive it: ``ros2 launch
kp_ros matcher.launch.py`` with the defaults, a camera process and the ros2 CLI each in a
clean environment (a plain shell with ROS sourced, no kp_ros set-up). Needs the ros2 CLI
and launch (a ROS 2 install, or ../shared/ros2-cli, which scripts/setup_env.sh installs)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ros_helpers import REPO_ROOT, clean_env, require_launch_and_installed_kp_ros


@pytest.fixture
def ros2():
    """The ros2 executable, or a skip that says what is missing."""
    exe = shutil.which("ros2")
    if exe is None:
        pytest.skip("the ros2 CLI is not installed (a ROS 2 install, or scripts/setup_env.sh "
                    "with ../shared/ros2-cli beside the repository)")
    require_launch_and_installed_kp_ros()
    yield exe
    subprocess.run([exe, "daemon", "stop"], env=clean_env(), capture_output=True, timeout=30)


def cli(*args: str, timeout: float = 30.0) -> str:
    """One ros2 command in a clean environment, stopped with SIGINT after ``timeout`` s
    (as Ctrl-C; ``ros2 topic hz`` runs until then); its output."""
    proc = subprocess.Popen(["ros2", *args], env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    return out


class Launch:
    """``ros2 launch kp_ros matcher.launch.py ARGS`` in a clean environment, its output in a
    file (not a terminal, as in a log collector)."""

    def __init__(self, log_path, *args: str):
        self.log_path = log_path
        self.proc = subprocess.Popen(["ros2", "launch", "kp_ros", "matcher.launch.py", *args],
                                     env=clean_env(), stdout=open(log_path, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, text: str, count: int = 1, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.log().count(text) >= count:
                return True
            time.sleep(0.2)
        return self.log().count(text) >= count

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole group
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def test_launch_with_defaults_serves_a_plain_camera_and_the_cli(
        ros2, tiny_superpoint_dir, tiny_eloftr_dir, tmp_path):
    launch = Launch(tmp_path / "launch.log", "image_topic:=/cli/image_raw", "device:=cpu",
                    f"superpoint_model:={tiny_superpoint_dir}", f"eloftr_model:={tiny_eloftr_dir}")
    camera = None
    try:
        assert launch.wait_for(" on /cli/image_raw", count=1), launch.log()[-4000:]
        # 640x480 rgb8, reliable, 4 Hz until stopped; it also times /keypoints.
        camera = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "test" / "plain_camera.py"), "--topic", "/cli/image_raw",
             "--rate", "4", "--count", "2000", "--subscribers", "1", "--listen", "/keypoints"],
            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        nodes = cli("node", "list", "--no-daemon", "--spin-time", "5")
        assert "/frontend_node" in nodes and "/eloftr_node" not in nodes, nodes  # the default
        hz = cli("topic", "hz", "/keypoints", "--window", "5", timeout=10)
        assert "average rate" in hz, hz
        # No daemon: its graph may not have the new publisher yet, and echo then gives up.
        stamp0 = cli("topic", "echo", "--once", "--no-daemon", "--spin-time", "10", "/matches",
                     "--field", "stamp0", timeout=60)
        assert "sec:" in stamp0, stamp0
        # --spin-time: without a daemon each call discovers the graph anew.
        rejected = cli("param", "set", "/frontend_node", "eloftr_model", "other", "--no-daemon",
                       "--spin-time", "5")
        assert "Setting parameter failed" in rejected and "restart the node" in rejected, rejected
        changed = cli("param", "set", "/frontend_node", "max_keypoints", "3", "--no-daemon",
                      "--spin-time", "5")
        assert "Set parameter successful" in changed, changed
        set_at = time.monotonic()
        time.sleep(6)
        camera.send_signal(signal.SIGINT)
        out, err = camera.communicate(timeout=180)  # a loaded 2-core machine can be slow here
        assert camera.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if camera is not None and camera.poll() is None:
            camera.kill()
        code = launch.stop()
    log = launch.log()
    assert code == 0, log[-4000:]
    # Every frame reached the node (reliable publisher, reliable_input: auto): >= 99 %.
    received = [int(n) for n in re.findall(r"received=(\d+) processed=", log)]
    assert len(received) == 1 and min(received) >= 0.99 * result["sent"], (result["sent"], log[-4000:])
    assert "with reliable QoS (auto)" in log
    before = [n for key, n in result["sizes"].items() if result["arrivals"][key] < set_at - 1]
    after = [n for key, n in result["sizes"].items() if result["published"][key] > set_at + 1]
    assert before and max(before) > 3, result["sizes"]
    assert after and max(after) <= 3, result["sizes"]
    assert "\x1b[" not in log  # no colour codes in a redirected log


def test_launch_shuts_down_and_fails_when_a_node_cannot_start(
        ros2, tiny_superpoint_dir, tiny_eloftr_dir, tmp_path):
    launch = Launch(tmp_path / "launch.log", "device:=gpu",
                    f"superpoint_model:={tiny_superpoint_dir}", f"eloftr_model:={tiny_eloftr_dir}")
    code = launch.proc.wait(timeout=180)
    log = launch.log()
    assert code != 0, log[-4000:]
    assert "cannot start" in log and "exited with code 1" in log, log[-4000:]
    assert "\x1b[" not in log
