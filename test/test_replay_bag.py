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


def image_bag(path, count=8, rate_hz=10.0, malformed=()):
    typestore = bag_messages.kp_ros_typestore()
    with bag_writer.AtomicBagWriter(path, "sqlite3") as writer:
        connection = writer.add_connection("/camera/image_raw", bag_messages.IMAGE_TYPE, typestore)
        for i in range(count):
            stamp = T0 + int(i * 1e9 / rate_hz)
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
