"""Helpers for tests that talk DDS: an rclpy context of the test's own, spinning until a
condition holds, and node executables run as real subprocesses (as the launch file runs them)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import rclpy
from rclpy.executors import SingleThreadedExecutor

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO_ROOT / "config" / "matcher.yaml"


@contextlib.contextmanager
def ros_node(name: str):
    """A node in a fresh rclpy context (so tests never share DDS state), with an executor."""
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(name, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        yield node, executor
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def spin_until(executor, predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        executor.spin_once(timeout_sec=0.05)
    return predicate()


def node_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HOME", "/tmp")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_node(executable: str, params: dict | None = None, remaps: dict | None = None,
               params_file: Path | None = PARAMS_FILE, namespace: str | None = None,
               log_path: Path | None = None) -> subprocess.Popen:
    """Run kp_ros.nodes.<executable> as its own process with the launch file's arguments:
    the parameters file, then per-node overrides, then remappings."""
    cmd = [sys.executable, "-m", f"kp_ros.nodes.{executable}", "--ros-args"]
    if params_file is not None:
        cmd += ["--params-file", str(params_file)]
    for key, value in (params or {}).items():
        value = str(value).lower() if isinstance(value, bool) else value
        cmd += ["-p", f"{key}:={value}"]
    for src, dst in (remaps or {}).items():
        cmd += ["-r", f"{src}:={dst}"]
    if namespace:
        cmd += ["-r", f"__ns:={namespace}"]
    out = open(log_path, "w") if log_path else subprocess.PIPE
    return subprocess.Popen(cmd, env=node_env(), stdout=out, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO_ROOT)


def stop_node(process: subprocess.Popen, timeout: float = 30.0) -> tuple[int, str]:
    """SIGINT (Ctrl-C), as ros2 launch does; returns (exit code, output)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return process.returncode, out or ""


def wait_for_subscribers(publisher, count: int, executor, timeout: float) -> bool:
    return spin_until(executor, lambda: publisher.get_subscription_count() >= count, timeout)
