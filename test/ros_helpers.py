"""Helpers for tests that talk DDS: an rclpy context of the test's own, spinning until a
condition holds, and node executables run as real subprocesses (as the launch file runs them)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import rclpy
from rclpy.executors import SingleThreadedExecutor

from kp_ros.testing import node_process

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
    """kp_ros's node environment running this checkout's code (unlike clean_env below)."""
    return node_process.node_env(source_root=REPO_ROOT, extra=extra)


def to_time(seconds: float):
    """builtin_interfaces/Time of ``seconds``, rounded to whole nanoseconds first: int() of
    an accumulated 1104.9999999 would give 1104 s and an invalid 1e9 ns."""
    from builtin_interfaces.msg import Time
    ns = round(seconds * 1e9)
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def require_launch_and_installed_kp_ros() -> None:
    """Skip (with the reason) unless launch_ros / launch_testing are importable and kp_ros
    is installed in an ament prefix, as ``ros2 launch kp_ros ...`` needs."""
    import pytest
    for module in ("launch_ros", "launch_testing"):
        pytest.importorskip(module, reason=f"{module} is not installed (a ROS 2 install has it; "
                                           "scripts/setup_env.sh installs it from ../shared/ros2-cli)")
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    try:
        get_package_share_directory("kp_ros")
    except PackageNotFoundError:
        pytest.skip("kp_ros is not installed in an ament prefix (scripts/setup_env.sh, or colcon "
                    "build && source install/setup.bash)")


def clean_env(extra: dict | None = None) -> dict:
    """The environment of a user's plain shell with ROS sourced (what a camera driver,
    ``ros2 bag play`` or the ros2 CLI started elsewhere gets): no FASTDDS_* or other
    variable kp_ros's own set-up adds, the same ROS_DOMAIN_ID as this test."""
    prefix = os.environ.get("AMENT_PREFIX_PATH", str(Path(sys.executable).resolve().parents[1]))
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
           "HOME": os.environ.get("HOME", "/tmp"), "AMENT_PREFIX_PATH": prefix,
           "ROS_DOMAIN_ID": os.environ["ROS_DOMAIN_ID"], "PYTHONUNBUFFERED": "1",
           "ROS_LOG_DIR": os.environ.get("ROS_LOG_DIR", "/tmp/kp_ros_test_logs")}
    env.update(extra or {})
    return env


def run_plain_camera(*args: str, timeout: float = 180.0) -> dict:
    """test/plain_camera.py in a clean environment (see clean_env); its JSON result."""
    import json
    result = subprocess.run([sys.executable, str(REPO_ROOT / "test" / "plain_camera.py"), *args],
                            env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_node(executable: str, params: dict | None = None, remaps: dict | None = None,
               params_file: Path | None = PARAMS_FILE, namespace: str | None = None,
               log_path: Path | None = None) -> node_process.NodeProcess:
    """Run kp_ros.nodes.<executable> as its own process with the launch file's arguments:
    the parameters file, then per-node overrides, then remappings."""
    return node_process.start_node(executable, log_path, params=params, params_file=params_file,
                                   remaps=remaps, namespace=namespace, env=node_env(), cwd=REPO_ROOT)


def stop_node(process: node_process.NodeProcess, timeout: float = 30.0) -> tuple[int, str]:
    """SIGINT (Ctrl-C), as ros2 launch does; returns (exit code, the node's log)."""
    return process.stop(timeout)


def wait_for_subscribers(publisher, count: int, executor, timeout: float) -> bool:
    return spin_until(executor, lambda: publisher.get_subscription_count() >= count, timeout)


class NodeHarness:
    """The test's side of a running node: publishes frames, collects outputs by stamp,
    reads /diagnostics and sets parameters through the node's parameter services."""

    def __init__(self, node, executor, image_topic: str, output_type, output_topic: str):
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image
        from kp_ros.ros.qos import output_qos
        self.node, self.executor = node, executor
        self.image_pub = node.create_publisher(Image, image_topic, output_qos())
        self.outputs = []
        self.diagnostics = {}
        self.output_sub = node.create_subscription(output_type, output_topic, self.outputs.append,
                                                   output_qos())
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            self.diagnostics[status.name.split(":")[0]] = {kv.key: kv.value for kv in status.values}

    def wait_ready(self, timeout: float = 60.0, node_fqn: str | None = None) -> bool:
        """Until both directions are discovered. DDS discovery is asymmetric: our publisher
        can see the node's subscription before the node's subscription sees our publisher,
        and a frame published in that window is lost (a volatile reader never gets it). The
        node's own /diagnostics reaching us shows its participant has taken in our
        endpoints; a short settle covers the publication announcement that travels apart."""
        ready = spin_until(self.executor, lambda: (
            self.image_pub.get_subscription_count() >= 1
            and self.output_sub.get_publisher_count() >= 1
            and (node_fqn is None or node_fqn in self.diagnostics)), timeout)
        spin_until(self.executor, lambda: False, 1.0)
        return ready

    def publish(self, msg) -> None:
        self.image_pub.publish(msg)

    def publish_frame(self, image, stamp_sec: float, frame_id: str = "camera", encoding=None):
        from kp_ros.ros.conversions import array_to_image_msg
        msg = array_to_image_msg(image, encoding)
        msg.header.stamp = to_time(stamp_sec)
        msg.header.frame_id = frame_id
        self.publish(msg)
        return msg

    def wait_output(self, stamp, timeout: float = 30.0):
        """The output whose header stamp equals ``stamp`` (a builtin_interfaces/Time)."""
        def find():
            return next((m for m in self.outputs if m.header.stamp == stamp), None)
        spin_until(self.executor, lambda: find() is not None, timeout)
        return find()

    def counters(self, node_fqn: str) -> dict:
        return {k: int(v) for k, v in self.diagnostics.get(node_fqn, {}).items()
                if k in ("received", "processed", "dropped", "rejected")}

    def wait_counters(self, node_fqn: str, predicate, timeout: float = 20.0) -> dict:
        spin_until(self.executor, lambda: predicate(self.counters(node_fqn)), timeout)
        return self.counters(node_fqn)

    def set_params(self, node_fqn: str, values: dict, timeout: float = 10.0):
        from rclpy.parameter import Parameter
        from rcl_interfaces.srv import SetParameters
        client = self.node.create_client(SetParameters, f"{node_fqn}/set_parameters")
        assert client.wait_for_service(timeout_sec=timeout), f"{node_fqn}/set_parameters not available"
        request = SetParameters.Request(
            parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
        future = client.call_async(request)
        spin_until(self.executor, future.done, timeout)
        self.node.destroy_client(client)
        return future.result().results


def parse_counters(log: str) -> dict:
    """The counters of a node's shutdown line 'received=.. processed=.. dropped=.. rejected=..'."""
    counts = node_process.parse_counters(log)
    assert counts is not None, f"no counters line in the node's log:\n{log[-2000:]}"
    return counts


class InProcessNode:
    """A node object in an rclpy context of its own, with a subscriber to its output: for
    tests that reach into the node (patch its core, time its worker) without DDS timing."""

    def __init__(self, node_class, namespace, output_type, output_topic, overrides):
        from rclpy.parameter import Parameter
        from kp_ros.ros.qos import output_qos
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = node_class(context=self.context, namespace=namespace, parameter_overrides=[
            Parameter(k, value=v) for k, v in overrides.items()])
        self.driver = rclpy.create_node("fault_driver", context=self.context)
        self.outputs = []
        self.driver.create_subscription(output_type, f"{namespace}/{output_topic}",
                                        self.outputs.append, output_qos())
        self.executor = SingleThreadedExecutor(context=self.context)
        self.node.start()  # as run_node does
        self.executor.add_node(self.driver)
        self.executor.add_node(self.node)
        self.submitted = 0

    def submit(self, image, stamp_sec: float, frame_id="camera", wait: bool = True):
        """Hand one frame to the node as its subscription callback does; by default wait
        until the worker is idle again."""
        from kp_ros.ros.conversions import array_to_image_msg
        msg = array_to_image_msg(image)
        msg.header.stamp = to_time(stamp_sec)
        msg.header.frame_id = frame_id
        self.node.input.on_image(msg)
        self.submitted += 1
        if wait:
            assert self.node.worker.wait_idle(60)
        return msg

    def output_for(self, msg, timeout=5.0):
        def find():
            return next((m for m in self.outputs if m.header.stamp == msg.header.stamp), None)
        spin_until(self.executor, lambda: find() is not None, timeout)
        return find()

    def close(self) -> str:
        self.node.shutdown()
        self.executor.shutdown()
        self.node.destroy_node()
        self.driver.destroy_node()
        rclpy.shutdown(context=self.context)
