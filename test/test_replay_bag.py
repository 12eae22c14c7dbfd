"""kp_ros.tools.replay_bag: pacing, argument errors, and a live replay into running
superpoint_node / eloftr_node whose counters must account for every published frame."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import synthetic_frame

from kp_ros.bags import messages as bag_messages
from kp_ros.bags import writer as bag_writer
from kp_ros.testing import node_process
from kp_ros.tools.replay_bag import Pacer
from ros_helpers import parse_counters

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000_000_000


def env() -> dict:
    """This test process's environment (its own ROS_DOMAIN_ID, from conftest) with the
    checkout first on the path, for the subprocesses."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def image_bag(path, count=8, rate_hz=10.0, malformed=(), t0=T0):
    typestore = bag_messages.kp_ros_typestore()
    with bag_writer.AtomicBagWriter(path, "sqlite3") as writer:
        connection = writer.add_connection("/camera/image_raw", bag_messages.IMAGE_TYPE, typestore)
        for i in range(count):
            stamp = t0 + int(i * 1e9 / rate_hz)
            msg = bag_messages.image_msg(typestore, synthetic_frame(128, 160, seed=0, shift=(2 * i, i)), "rgb8",
                                         bag_messages.header_msg(typestore, stamp, "camera"))
            if i in malformed:
                msg.step = 7  # shorter than one row: the nodes must reject it
            writer.write(connection, stamp, typestore.serialize_cdr(msg, bag_messages.IMAGE_TYPE))
    return path


def test_pacer_follows_recorded_times_scaled():
    pacer = Pacer(rate_scale=2.0)
    start = time.monotonic()
    for log_ns in (0, 100_000_000, 200_000_000):  # 0.2 s recorded -> 0.1 s at x2
        pacer.wait(log_ns)
    assert 0.09 <= time.monotonic() - start < 0.5
    fast = Pacer(rate_scale=None)
    start = time.monotonic()
    fast.wait(0), fast.wait(10**12)
    assert time.monotonic() - start < 0.05
    with pytest.raises(ValueError):
        Pacer(rate_scale=0.0)


def test_bad_topic_and_missing_bag(tmp_path):
    image_bag(tmp_path / "bag", count=1)
    for args, message in ((["--topic", "/nope"], "image topics in the bag: /camera/image_raw"),
                          ([], "does not exist")):
        bag = str(tmp_path / ("bag" if args else "missing"))
        result = subprocess.run([sys.executable, "-m", "kp_ros.tools.replay_bag", bag, *args],
                                capture_output=True, text=True, timeout=60, env=env())
        assert result.returncode == 1 and message in result.stderr


def _start_node(module: str, model: Path, log: Path) -> node_process.NodeProcess:
    return node_process.start_node(
        module, log, params={"model": model, "device": "cpu", "resize": "native", "reliable_input": True},
        remaps={"image": "/camera/image_raw"}, env=env(), cwd=REPO)


def test_live_replay_every_frame_accounted_for(tmp_path, tiny_superpoint_dir, tiny_eloftr_dir):
    """replay_bag -> superpoint_node + eloftr_node (reliable): each node receives every
    published frame, and received = processed + dropped + rejected (the malformed frame
    is rejected, or dropped if it arrived while the node was busy)."""
    pytest.importorskip("rclpy", reason="rclpy is needed for a live replay")
    pytest.importorskip("kp_ros.msg", reason="kp_ros messages are not built/installed")
    for module in ("superpoint_node", "eloftr_node"):
        if not (REPO / "kp_ros" / "nodes" / f"{module}.py").is_file():
            pytest.skip(f"kp_ros/nodes/{module}.py is not there yet")
    bag = image_bag(tmp_path / "bag", count=8, malformed={3})
    logs = {"superpoint_node": tmp_path / "superpoint.log", "eloftr_node": tmp_path / "eloftr.log"}
    nodes = {"superpoint_node": _start_node("superpoint_node", tiny_superpoint_dir, logs["superpoint_node"]),
             "eloftr_node": _start_node("eloftr_node", tiny_eloftr_dir, logs["eloftr_node"])}
    try:
        replay = subprocess.run(
            [sys.executable, "-m", "kp_ros.tools.replay_bag", str(bag), "--wait-for-subscribers", "2",
             "--wait-timeout", "90"],
            capture_output=True, text=True, timeout=150, env=env())
        assert replay.returncode == 0, replay.stderr + "".join(p.read_text() for p in logs.values())
        published = int(re.search(r"published (\d+) frames", replay.stdout).group(1))
        assert published == 8
        time.sleep(1.0)  # let the last frame finish in the workers
    finally:
        node_process.stop_nodes(nodes.values())
    for name, log in logs.items():
        text = log.read_text()
        assert "shutting down: received=" in text, f"{name} logged no counters at shutdown:\n{text}"
        received, processed, dropped, rejected = parse_counters(text).values()
        assert received == published, f"{name}: {text}"
        assert processed + dropped + rejected == received, f"{name}: {text}"
        assert dropped + rejected >= 1 and processed <= published - 1, f"{name}: {text}"


def _diagnostic_values(msg) -> dict[str, str]:
    return {kv.key: kv.value for status in msg.status for kv in status.values}


def test_replay_with_clock_gives_sim_time_latencies(tmp_path, tiny_superpoint_dir):
    """replay_bag --clock -> superpoint_node with use_sim_time: the stamp latency on
    /diagnostics is measured on the bag's time line (seconds), not wall time minus a
    2001 stamp (years); the /clock it publishes follows the bag's receive times."""
    pytest.importorskip("kp_ros.msg", reason="kp_ros messages are not built/installed")
    from rosgraph_msgs.msg import Clock
    from diagnostic_msgs.msg import DiagnosticArray
    from ros_helpers import ros_node, spin_until
    t0_2001 = 1_000_000_000_000_000_000
    bag = image_bag(tmp_path / "bag", count=30, rate_hz=10.0, t0=t0_2001)
    log = tmp_path / "superpoint.log"
    node = node_process.start_node(
        "superpoint_node", log, params={"model": tiny_superpoint_dir, "device": "cpu",
                                        "resize": "native", "reliable_input": True,
                                        "use_sim_time": True, "diagnostics_period": 0.3},
        remaps={"image": "/camera/image_raw"}, env=env(), cwd=REPO)
    clocks, latencies = [], []

    def on_diagnostics(msg):
        values = _diagnostic_values(msg)
        if float(values.get("processed", "0")) > 0 and "stamp latency median (ms)" in values:
            latencies.append(float(values["stamp latency median (ms)"]))

    try:
        with ros_node("sim_time_probe") as (probe, executor):
            probe.create_subscription(Clock, "/clock", lambda m: clocks.append(m.clock.sec), 10)
            probe.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
            replay = subprocess.Popen(
                [sys.executable, "-m", "kp_ros.tools.replay_bag", str(bag), "--clock",
                 "--wait-for-subscribers", "1", "--wait-timeout", "90"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
            spin_until(executor, lambda: replay.poll() is not None, timeout=150)
            output = replay.communicate(timeout=30)[0]
    finally:
        node_process.stop_nodes([node])
    assert replay.returncode == 0, output + log.read_text()
    assert clocks and all(abs(sec - t0_2001 // 10**9) < 10 for sec in clocks), clocks[:5]
    assert latencies, f"no /diagnostics with a stamp latency:\n{log.read_text()}"
    # Wall clock minus a 2001 stamp would be ~8e11 ms; on the bag's clock it is the
    # processing time plus at most a clock period.
    assert all(abs(ms) < 10_000 for ms in latencies), latencies
