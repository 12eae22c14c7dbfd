"""kp_ros with the ROS 2 world around it: a camera that is somebody else's process, started
in a clean environment (no FASTDDS_* or other kp_ros set-up), with reliable or best-effort
QoS, and the warnings a user gets when nothing can arrive. The real ros2 CLI and
``ros2 launch`` are in test_ros2_cli.py."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ros_helpers import (REPO_ROOT, clean_env, parse_counters, run_plain_camera, start_node,
                         stop_node)


@pytest.fixture
def superpoint(tiny_superpoint_dir, tmp_path):
    """superpoint_node with the shipped parameters file (reliable_input: auto), image on
    /plain/image_raw; yields a function that stops it and returns (exit code, log)."""
    procs = []

    def start(**params):
        proc = start_node("superpoint_node", {"model": str(tiny_superpoint_dir), "device": "cpu",
                                              "max_keypoints": 64, **params},
                          remaps={"image": "/plain/image_raw",
                                  "image/compressed": "/plain/image_raw/compressed"}, log_path=tmp_path / "node.log")
        procs.append(proc)
        # Up and announced (imports take seconds): a stop before that would test nothing.
        assert wait_for_log(tmp_path / "node.log", " on /plain/image_raw"), \
            (tmp_path / "node.log").read_text()[-3000:]
        return proc

    yield start
    for proc in procs:
        stop_node(proc)


def stopped_log(proc, tmp_path) -> str:
    code, _ = stop_node(proc)
    log = (tmp_path / "node.log").read_text()
    assert code == 0, log[-3000:]
    return log


def test_defaults_take_every_full_frame_of_a_plain_reliable_camera(superpoint, tmp_path):
    """640x480 rgb8 from a reliable publisher over the default transports: the subscription
    follows it (reliable) and every frame arrives (best effort lost ~40 % of such frames)."""
    proc = superpoint()
    result = run_plain_camera("--topic", "/plain/image_raw", "--rate", "5", "--count", "20",
                              "--reliability", "reliable", "--listen", "/keypoints")
    log = stopped_log(proc, tmp_path)
    assert result["matched"] == 1, log[-3000:]
    counts = parse_counters(log)
    assert counts["received"] == 20, (counts, log[-3000:])
    assert counts["received"] == counts["processed"] + counts["dropped"] + counts["rejected"]
    assert counts["rejected"] == 0
    assert len(result["arrivals"]) == counts["processed"] >= 1
    assert "with reliable QoS (auto)" in log


def test_defaults_connect_to_a_best_effort_camera(superpoint, tmp_path):
    """A best-effort camera is heard (a reliable subscription would not match it at all);
    320x240 frames fit the default shared-memory segment, so none is lost."""
    proc = superpoint()
    result = run_plain_camera("--topic", "/plain/image_raw", "--rate", "5", "--count", "20",
                              "--width", "320", "--height", "240", "--reliability", "best_effort",
                              "--listen", "/keypoints")
    log = stopped_log(proc, tmp_path)
    assert result["matched"] == 1, log[-3000:]
    counts = parse_counters(log)
    assert counts["received"] >= 18, (counts, log[-3000:])
    assert len(result["arrivals"]) >= 1
    assert "with best-effort QoS (auto)" in log
    assert "config/fastdds/camera_large_frames.xml" in log  # the cure, named where it applies


def test_a_forced_reliable_subscription_warns_about_a_best_effort_camera(superpoint, tmp_path):
    proc = superpoint(reliable_input="reliable")
    run_plain_camera("--topic", "/plain/image_raw", "--rate", "5", "--count", "10",
                     "--width", "160", "--height", "120", "--reliability", "best_effort",
                     "--wait", "8", "--subscribers", "1")
    # The best-effort camera has gone; a reliable one replaces it: the warning is lifted
    # (on /diagnostics too: the same ``problem``) and its frames arrive.
    result = run_plain_camera("--topic", "/plain/image_raw", "--rate", "5", "--count", "10",
                              "--width", "160", "--height", "120", "--reliability", "reliable",
                              "--listen", "/keypoints")
    log = stopped_log(proc, tmp_path)
    assert "offers QoS incompatible" in log and "RELIABILITY" in log, log[-3000:]
    assert log.index("offers QoS incompatible") < log.index("publisher matched, frames can flow"), log[-3000:]
    assert result["matched"] == 1
    assert parse_counters(log)["received"] == 10, log[-3000:]


def wait_for_log(path, text: str, timeout: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return True
        time.sleep(0.2)
    return False


def test_warns_once_when_only_the_raw_topic_is_published(superpoint, tmp_path):
    """use_compressed on a camera that publishes raw frames only: one warning naming the
    topic, the expected type and the fix, not one per frame."""
    proc = superpoint(use_compressed=True)
    camera = subprocess.Popen([sys.executable, str(REPO_ROOT / "test" / "plain_camera.py"),
                               "--topic", "/plain/image_raw", "--rate", "10", "--count", "100000",
                               "--width", "160", "--height", "120", "--subscribers", "0",
                               "--settle", "0"], env=clean_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        assert wait_for_log(tmp_path / "node.log", "no frames can arrive")
        time.sleep(3)  # 12 more polls, 30 more frames: still one warning
    finally:
        camera.kill()
        camera.wait()
    log = stopped_log(proc, tmp_path)
    warnings = [line for line in log.splitlines() if "no frames can arrive" in line]
    assert len(warnings) == 1, log[-3000:]
    assert "/plain/image_raw/compressed" in warnings[0]
    assert "sensor_msgs/msg/CompressedImage" in warnings[0]
    assert "use_compressed:=false" in warnings[0]


def test_warns_when_no_publisher_at_all(superpoint, tmp_path):
    proc = superpoint()
    assert wait_for_log(tmp_path / "node.log", "no frames can arrive")
    time.sleep(2)
    log = stopped_log(proc, tmp_path)
    warnings = [line for line in log.splitlines() if "no frames can arrive" in line]
    assert len(warnings) == 1, log[-3000:]
    assert "no publisher" in warnings[0] and "FASTDDS_BUILTIN_TRANSPORTS" in warnings[0]
