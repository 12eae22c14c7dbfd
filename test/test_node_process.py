"""kp_ros/testing/node_process.py: the command line and environment of a node process, a
clean stop (and a kill when SIGINT is ignored), and the counters read back from the log
of a real superpoint_node that was sent one good and one malformed frame."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kp_ros.ros.frame_worker import FrameCounts
from kp_ros.testing import node_process
from kp_ros.testing.node_process import NodeProcess, node_command, node_env

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_command_has_the_launch_files_order():
    cmd = node_command("superpoint_node", params={"model": Path("/m"), "debug_image": True, "max_keypoints": 5},
                       params_file=Path("/c/matcher.yaml"), remaps={"image": "/cam"}, namespace="/ns")
    assert cmd == [sys.executable, "-m", "kp_ros.nodes.superpoint_node", "--ros-args",
                   "--params-file", "/c/matcher.yaml", "-p", "model:=/m", "-p", "debug_image:=true",
                   "-p", "max_keypoints:=5", "-r", "image:=/cam", "-r", "__ns:=/ns"]
    assert node_command("track_node") == [sys.executable, "-m", "kp_ros.nodes.track_node", "--ros-args"]


def test_env_puts_the_source_tree_first_once_and_fills_what_rcl_needs():
    base = {"PATH": "/bin", "PYTHONPATH": "/other"}
    env = node_env(base, source_root=Path("/src"), domain_id=42, threads=2, extra={"X": "1"})
    assert env == {"PATH": "/bin", "PYTHONPATH": os.pathsep.join(["/src", "/other"]), "HOME": "/tmp",
                   "ROS_LOG_DIR": "/tmp/.ros/log", "PYTHONUNBUFFERED": "1", "ROS_DOMAIN_ID": "42",
                   "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "X": "1"}
    assert base == {"PATH": "/bin", "PYTHONPATH": "/other"}  # the caller's mapping is left alone
    again = node_env(env, source_root=Path("/src"))  # an environment already set up stays as it is
    assert again == env
    kept = node_env({"HOME": "/h", "ROS_LOG_DIR": "/logs"}, source_root=None)
    assert kept == {"HOME": "/h", "ROS_LOG_DIR": "/logs", "PYTHONUNBUFFERED": "1"}
    assert node_env({}, source_root=Path("/src"))["PYTHONPATH"] == "/src"
    assert node_process.IN_SOURCE_TREE and node_process.SOURCE_ROOT == REPO_ROOT


def test_counters_and_summary_from_a_log():
    counts = FrameCounts(received=7, processed=4, dropped=2, rejected=1)
    counts.reasons["bad encoding"] = 1
    log = f"[INFO] started\n[INFO] [superpoint_node]: shutting down: {counts.summary()}\n"
    assert node_process.parse_counters(log) == {"received": 7, "processed": 4, "dropped": 2, "rejected": 1}
    assert node_process.shutdown_summary(log) == counts.summary()
    assert node_process.parse_counters("no counters") is None
    assert node_process.shutdown_summary("no counters") is None


def test_stop_kills_a_process_that_ignores_sigint(tmp_path):
    script = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              "print('up', flush=True); time.sleep(60)")
    process = NodeProcess([sys.executable, "-c", script], tmp_path / "logs" / "stubborn.log")
    deadline = time.monotonic() + 60
    while "up" not in process.log_text() and time.monotonic() < deadline:
        assert process.poll() is None
        time.sleep(0.05)
    code, text = process.stop(timeout=1.0)
    assert code == -9 and text == "up\n"


def test_real_node_started_stopped_and_counted(tiny_superpoint_dir, tmp_path):
    """superpoint_node as the launch file runs it, on this test process's domain: one good
    frame, one truncated one; SIGINT ends it cleanly and its shutdown line counts both."""
    from sensor_msgs.msg import Image

    from conftest import synthetic_frame
    from kp_ros.msg import Keypoints
    from ros_helpers import NodeHarness, ros_node

    namespace = "/np_test"
    process = node_process.start_node(
        "superpoint_node", tmp_path / "node.log", namespace=namespace,
        params={"model": tiny_superpoint_dir, "device": "cpu", "max_keypoints": 20, "diagnostics_period": 0.2},
        params_file=REPO_ROOT / "config" / "matcher.yaml", remaps={"image": f"{namespace}/camera/image_raw"},
        env=node_env(source_root=REPO_ROOT, domain_id=int(os.environ["ROS_DOMAIN_ID"])), cwd=REPO_ROOT)
    try:
        with ros_node("np_test_driver") as (node, executor):
            harness = NodeHarness(node, executor, f"{namespace}/camera/image_raw", Keypoints,
                                  f"{namespace}/keypoints")
            assert harness.wait_ready(120, f"{namespace}/superpoint_node"), process.log_text()
            sent = harness.publish_frame(synthetic_frame(120, 160, seed=3), 900.0)
            assert harness.wait_output(sent.header.stamp, 60) is not None, process.log_text()
            harness.publish(Image(height=8, width=8, encoding="rgb8", step=24, data=bytes(10)))
            harness.wait_counters(f"{namespace}/superpoint_node", lambda c: c.get("rejected") == 1, 30)
    finally:
        code, text = process.stop(timeout=60)
    assert code == 0 and "Traceback" not in text, text[-3000:]
    assert text == (tmp_path / "node.log").read_text()
    assert node_process.parse_counters(text) == {"received": 2, "processed": 1, "dropped": 0, "rejected": 1}
    assert node_process.shutdown_summary(text).startswith("received=2 processed=1 dropped=0 rejected=1")
