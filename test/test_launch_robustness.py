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

NODES = ("superpoint_node", "eloftr_node", "track_node")


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
        assert launch.wait_for(f" on {topic}", count=2), launch.log()[-4000:]
        camera = subprocess.run(
            [sys.executable, str(REPO_ROOT / "test" / "plain_camera.py"), "--topic", topic,
             "--width", "128", "--height", "96", "--rate", "4", "--subscribers", "2",
             "--stamps", "100,101,-5,102,103", "--linger", "2"],
            env=clean_env(), capture_output=True, text=True, timeout=120)
        assert camera.returncode == 0, camera.stderr[-3000:]
        assert launch.wait_for("bad stamp: negative seconds", count=2, timeout=30), launch.log()[-4000:]
        assert launch.proc.poll() is None, launch.log()[-4000:]  # the launch and its nodes live on
        pids = node_pids(topic)
        assert len(pids) >= 3, pids  # superpoint_node, eloftr_node, track_node
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
    for name in ("superpoint_node", "eloftr_node"):
        assert "parent process" in logs[name], logs[name][-2000:]
        counts = parse_counters(logs[name])
        assert counts is not None, logs[name][-2000:]
        assert counts["received"] == 5 and counts["rejected"] == 1, (name, counts)
    assert "stream resets: 0" in logs["eloftr_node"]  # a bad stamp is a reject, not a reset
    # Every Matches eloftr_node published reached track_node: one per processed frame after
    # the first (100-101-102-103 when none was dropped under load).
    matched = parse_counters(logs["eloftr_node"])["processed"] - 1
    assert f"matches {matched}," in logs["track_node"], logs["track_node"][-2000:]
    assert "parent process" in logs["track_node"] and "shutting down:" in logs["track_node"]
