"""track_node in its own process, fed hand-made Keypoints and Matches over DDS (no models):
Tracks per Keypoints frame with linked ids whichever input comes first, new tracks after
the match timeout, bad input counted, runtime parameters checked, the debug image drawn
when subscribed, a clean shutdown."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import Image

from conftest import synthetic_frame
from kp_ros.msg import Keypoints, Matches, Tracks
from kp_ros.ros.conversions import array_to_image_msg, keypoints_to_msg, matches_to_msg, tracks_from_msg
from kp_ros.ros.qos import output_qos
from ros_helpers import node_env, ros_node, spin_until, start_node, stop_node

NS = "/tr_test"
NODE = f"{NS}/track_node"
TIMEOUT = 0.5


def stamp(sec: float) -> Time:
    return Time(sec=int(sec), nanosec=int(round((sec % 1) * 1e9)))


class Driver:
    def __init__(self, node, executor):
        self.node, self.executor = node, executor
        self.kp_pub = node.create_publisher(Keypoints, f"{NS}/keypoints", output_qos())
        self.match_pub = node.create_publisher(Matches, f"{NS}/matches", output_qos())
        self.image_pub = node.create_publisher(Image, f"{NS}/image", output_qos())
        self.tracks: list[Tracks] = []
        self.debug: list[Image] = []
        self.diagnostics = {}
        self.sub = node.create_subscription(Tracks, f"{NS}/tracks", self.tracks.append, output_qos())
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)

    def _on_diag(self, msg):
        for status in msg.status:
            if status.name.startswith(NODE + ":"):
                self.diagnostics = {kv.key: kv.value for kv in status.values}

    def keypoints(self, sec: float, xy) -> None:
        header = Keypoints().header
        header.stamp, header.frame_id = stamp(sec), "camera"
        xy = np.asarray(xy, np.float32).reshape(-1, 2)
        self.kp_pub.publish(keypoints_to_msg(header, 120, 160, "test", xy, np.ones(len(xy))))

    def matches(self, sec: float, sec0: float, xy0, xy1, inliers=None, index0=None, index1=None) -> None:
        """Matches of (sec0 -> sec); without index0 / index1 as a dense matcher (or a kp_ros
        from before those fields) publishes them: linked by radius."""
        header = Matches().header
        header.stamp, header.frame_id = stamp(sec), "camera"
        xy0 = np.asarray(xy0, np.float32).reshape(-1, 2)
        self.match_pub.publish(matches_to_msg(header, stamp(sec0), "camera", 120, 160, "test", xy0,
                                              np.asarray(xy1, np.float32).reshape(-1, 2),
                                              np.ones(len(xy0), np.float32), inliers, index0, index1))

    def wait_tracks(self, sec: float, timeout: float = 10.0) -> Tracks | None:
        def find():
            return next((t for t in self.tracks if t.header.stamp == stamp(sec)), None)
        spin_until(self.executor, lambda: find() is not None, timeout)
        return find()

    def counter(self, key: str) -> int:
        return int(self.diagnostics.get(key, 0))


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    log = tmp_path_factory.mktemp("track_node") / "node.log"
    process = start_node("track_node", namespace=NS, log_path=log, params_file=None,
                         params={"match_timeout": TIMEOUT, "diagnostics_period": 0.2})
    with ros_node("tr_test_driver") as (node, executor):
        driver = Driver(node, executor)
        ready = spin_until(executor, lambda: (
            driver.kp_pub.get_subscription_count() >= 1 and driver.match_pub.get_subscription_count() >= 1
            and driver.sub.get_publisher_count() >= 1 and driver.diagnostics), 60)
        assert ready, f"node never came up:\n{log.read_text()}"
        spin_until(executor, lambda: False, 1.0)  # discovery settles both ways (see ros_helpers)
        yield driver, process, log
        stop_node(process)


K0 = np.array([[10, 10], [50, 50], [90, 20]], np.float32)


def test_tracks_link_whichever_input_comes_first(running):
    driver, _, _ = running
    driver.keypoints(1.0, K0)
    driver.matches(1.1, 1.0, K0[:2], K0[:2] + [2, 1])  # matches before the keypoints
    first = driver.wait_tracks(1.0)
    assert first is not None
    k1 = np.vstack([K0[1] + [2, 1], [140, 100], K0[0] + [2, 1]])
    driver.keypoints(1.1, k1)
    second = driver.wait_tracks(1.1)
    assert second is not None, "no Tracks for the second frame"
    a, b = tracks_from_msg(first), tracks_from_msg(second)
    assert np.array_equal(b["keypoints"], k1) and second.header.frame_id == "camera"
    assert (second.height, second.width) == (120, 160)
    assert b["previous_index"].tolist() == [1, -1, 0]
    assert b["ids"][0] == a["ids"][1] and b["ids"][2] == a["ids"][0]
    assert b["ids"][1] not in a["ids"]
    assert b["lengths"].tolist() == [2, 1, 2]
    # keypoints first, matches later
    k2 = k1 + [1, 0]
    driver.keypoints(1.2, k2)
    driver.matches(1.2, 1.1, k1, k2)
    third = tracks_from_msg(driver.wait_tracks(1.2))
    assert third["ids"].tolist() == b["ids"].tolist() and third["lengths"].tolist() == [3, 2, 3]


def test_indices_link_beyond_the_radius_and_matches_without_them_by_radius(running):
    """A sparse matcher's Matches (index0 / index1) link exactly, whatever the motion;
    Matches without indices (a dense matcher, or recorded by a kp_ros from before the
    fields) are associated by position within association_radius (3 px)."""
    driver, _, _ = running
    driver.keypoints(5.0, K0)
    first = tracks_from_msg(driver.wait_tracks(5.0, timeout=TIMEOUT + 10))
    k1 = K0[[2, 0, 1]] + [40, 30]  # far beyond the radius, shuffled
    driver.keypoints(5.1, k1)
    driver.matches(5.1, 5.0, K0[:2], k1[[1, 2]], index0=[0, 1], index1=[1, 2])
    second = tracks_from_msg(driver.wait_tracks(5.1))
    assert second["previous_index"].tolist() == [-1, 0, 1]
    assert second["ids"][1] == first["ids"][0] and second["ids"][2] == first["ids"][1]
    k2 = k1 + [1.5, -1]
    driver.keypoints(5.2, k2)
    driver.matches(5.2, 5.1, k1, k2)  # no indices: by radius
    third = tracks_from_msg(driver.wait_tracks(5.2))
    assert third["previous_index"].tolist() == [0, 1, 2]
    assert third["ids"].tolist() == second["ids"].tolist() and third["lengths"].tolist() == [2, 3, 3]
    k3 = k2 + [1, 0]
    driver.keypoints(5.3, k3)
    driver.matches(5.3, 5.2, k2 + [6, 6], k3)  # no indices, starting 8.5 px off: nothing links
    assert (tracks_from_msg(driver.wait_tracks(5.3))["previous_index"] == -1).all()


def test_frame_without_matches_gets_new_tracks_after_timeout(running):
    driver, _, _ = running
    driver.keypoints(2.0, K0)
    out = driver.wait_tracks(2.0, timeout=TIMEOUT + 10)
    assert out is not None
    assert (tracks_from_msg(out)["previous_index"] == -1).all()
    assert tracks_from_msg(out)["lengths"].tolist() == [1, 1, 1]


def test_bad_matches_are_rejected_and_counted(running):
    driver, _, _ = running
    rejected = driver.counter("rejected")
    bad = Matches()
    bad.header.stamp, bad.stamp0 = stamp(3.1), stamp(3.0)
    bad.x0, bad.y0 = [1.0, 2.0], [1.0]  # x0 and y0 disagree
    driver.match_pub.publish(bad)
    assert spin_until(driver.executor, lambda: driver.counter("rejected") > rejected, 10)
    driver.keypoints(3.0, K0)  # the node still works
    assert driver.wait_tracks(3.0, timeout=TIMEOUT + 10) is not None


def test_runtime_parameters(running):
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter
    driver, _, _ = running
    client = driver.node.create_client(SetParameters, f"{NODE}/set_parameters")
    assert client.wait_for_service(timeout_sec=10)

    def set_(name, value):
        future = client.call_async(SetParameters.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg()]))
        spin_until(driver.executor, future.done, 10)
        return future.result().results[0]

    assert set_("association_radius", 5.0).successful
    assert not set_("association_radius", 100.0).successful  # outside its range
    result = set_("association", "nearest")
    assert not result.successful and "flow" in result.reason
    result = set_("max_pending", 3)
    assert not result.successful and "restart" in result.reason
    assert set_("association", "points").successful
    assert set_("association", "flow").successful
    assert set_("association_radius", 3.0).successful
    driver.node.destroy_client(client)


def test_debug_image_when_subscribed(running):
    driver, _, _ = running
    sub = driver.node.create_subscription(Image, f"{NODE}/debug_image", driver.debug.append, output_qos())
    assert spin_until(driver.executor, lambda: driver.image_pub.get_subscription_count() >= 1, 10)
    spin_until(driver.executor, lambda: False, 1.0)
    image = synthetic_frame(120, 160)
    for k, sec in enumerate((4.0, 4.1)):
        msg = array_to_image_msg(image, "rgb8")
        msg.header.stamp = stamp(sec)
        driver.image_pub.publish(msg)
        spin_until(driver.executor, lambda: False, 0.2)
        driver.keypoints(sec, K0 + k)
        if k:
            driver.matches(sec, 4.0, K0, K0 + k)
    assert driver.wait_tracks(4.1) is not None
    assert spin_until(driver.executor, lambda: any(m.header.stamp == stamp(4.1) for m in driver.debug), 10)
    debug = next(m for m in driver.debug if m.header.stamp == stamp(4.1))
    assert (debug.height, debug.width, debug.encoding) == (120, 160, "rgb8")
    drawn = np.frombuffer(bytes(debug.data), np.uint8).reshape(120, 160, 3)
    assert (drawn != image).any(axis=2).sum() > 20  # trails and dots over the frame
    driver.node.destroy_subscription(sub)


def test_counters_and_clean_shutdown(tmp_path):
    log = tmp_path / "node.log"
    process = start_node("track_node", namespace="/tr_stop", log_path=log, params_file=None)
    with ros_node("tr_stop_driver") as (node, executor):
        seen = []
        node.create_subscription(Tracks, "/tr_stop/tracks", seen.append, output_qos())
        spin_until(executor, lambda: "tracks from" in log.read_text(), 60)
    code, _ = stop_node(process)
    text = log.read_text()
    assert code == 0, text
    assert "shutting down: keypoints 0" in text


def test_invalid_parameter_stops_start_with_one_line():
    result = subprocess.run([sys.executable, "-m", "kp_ros.nodes.track_node", "--ros-args",
                             "-p", "association:=nearest"], env=node_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot start" in result.stdout + result.stderr and "Traceback" not in result.stderr
