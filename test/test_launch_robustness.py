"""The real ``ros2 launch kp_ros matcher.launch.py`` against a camera with a clock bug and
stopped the way ``docker stop`` / ``systemctl stop`` stop it: one frame with a negative
stamp costs that frame (counted) and nothing else; SIGTERM to ``ros2 launch`` (which then
ends at once, without stopping its nodes) leaves no kp_ros node running, and each node
shuts down cleanly (its counters line in its ROS log file)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ros_helpers import REPO_ROOT, clean_env
from test_ros2_cli import Launch, ros2  # noqa: F401 - the fixture

from kp_ros.testing.node_process import parse_counters

NODES = ("frontend_node",)  # the default launch


def node_pids(token: str) -> dict[int, str]:
    """pid -> command line of every running process whose command line has ``token``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if token in cmd and "kp_ros" in cmd:
                found[int(entry.name)] = cmd
    return found


def test_negative_stamp_costs_one_frame_and_sigterm_leaves_no_node(
        ros2, tiny_superpoint_dir, tiny_eloftr_dir, tmp_path, monkeypatch):  # noqa: F811
    topic = f"/robust_{os.getpid()}/image_raw"
    log_dir = tmp_path / "ros_logs"
    monkeypatch.setenv("ROS_LOG_DIR", str(log_dir))  # clean_env passes it on
    launch = Launch(tmp_path / "launch.log", f"image_topic:={topic}", "device:=cpu",
                    f"superpoint_model:={tiny_superpoint_dir}", f"eloftr_model:={tiny_eloftr_dir}")
    try:
        assert launch.wait_for(f" on {topic}", count=1), launch.log()[-4000:]
        camera = subprocess.run(
            [sys.executable, str(REPO_ROOT / "test" / "plain_camera.py"), "--topic", topic,
             "--width", "128", "--height", "96", "--rate", "4", "--subscribers", "1",
             "--stamps", "100,101,-5,102,103", "--linger", "2"],
            env=clean_env(), capture_output=True, text=True, timeout=120)
        assert camera.returncode == 0, camera.stderr[-3000:]
        assert launch.wait_for("bad stamp: negative seconds", count=1, timeout=30), launch.log()[-4000:]
        assert launch.proc.poll() is None, launch.log()[-4000:]  # the launch and its nodes live on
        pids = node_pids(topic)
        assert len(pids) >= 1, pids  # frontend_node
        os.kill(launch.proc.pid, signal.SIGTERM)  # the launch alone, as docker stop does
        launch.proc.wait(timeout=30)
        deadline = time.monotonic() + 30  # the watch polls every 0.5 s; shutdown finishes a frame
        while node_pids(topic) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = node_pids(topic)
    finally:
        if launch.proc.poll() is None:
            os.killpg(launch.proc.pid, signal.SIGKILL)
        for pid in node_pids(topic):  # only this test's nodes (its unique topic)
            os.kill(pid, signal.SIGKILL)
    assert not left, f"nodes outlived the launch: {left}\n{launch.log()[-3000:]}"
    # Each node's own ROS log file (named after its executable, python3_<pid>_...).
    files = [p.read_text() for p in log_dir.glob("*.log")]
    logs = {name: "".join(t for t in files if f"[{name}]" in t) for name in NODES}
    log = logs["frontend_node"]
    assert "parent process" in log, log[-2000:]
    counts = parse_counters(log)
    assert counts is not None, log[-2000:]
    assert counts["received"] == 5 and counts["rejected"] == 1, counts
    # A bad stamp is a reject, not a reset; every processed frame got its Tracks.
    assert f"tracks published {counts['processed']}," in log and "stream resets 0" in log, log[-2000:]
