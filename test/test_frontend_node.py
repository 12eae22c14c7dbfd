"""frontend_node: detection, matches and tracks of each frame in one process. A real node
process fed over DDS in lockstep (mono EfficientLoFTR, mono LightGlue, stereo on a synthetic
rectified pair: right = left shifted 16 px, fx 300, baseline 0.1 m), and one node object in
its own rclpy context whose matcher uses hand-made features (test_eloftr_correctness) where
random weights match too little to give every track a depth. Each test has its own
namespace and node; bad input is counted; the shutdown line accounts for every frame."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud  # noqa: E402

from conftest import synthetic_frame  # noqa: E402
from kp_ros.msg import Keypoints, Matches, StereoMatches, Tracks  # noqa: E402
from kp_ros.ros.conversions import (array_to_image_msg, matches_from_msg,  # noqa: E402
                                    stereo_matches_from_msg, tracks_from_msg)
from kp_ros.ros.qos import output_qos  # noqa: E402
from ros_helpers import (parse_counters, ros_node, spin_until, start_node, stop_node,  # noqa: E402
                         to_time)

HEIGHT, WIDTH = 224, 320  # multiples of 32: model pixels == source pixels with resize native
DISPARITY, FX, BASELINE = 16, 300.0, 0.1
PARAMS = {"device": "cpu", "resize": "native", "match_threshold": 0.0, "filter_threshold": 0.0,
          "max_keypoints": 256, "inliers_only": False, "association_radius": 8.0,
          "diagnostics_period": 0.2}


def camera_info(stamp, frame_id: str, tx: float) -> CameraInfo:
    info = CameraInfo(width=WIDTH, height=HEIGHT, distortion_model="plumb_bob")
    info.header.stamp, info.header.frame_id = stamp, frame_id
    info.k = [FX, 0.0, WIDTH / 2, 0.0, FX, HEIGHT / 2, 0.0, 0.0, 1.0]
    info.p = [FX, 0.0, WIDTH / 2, tx, 0.0, FX, HEIGHT / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


def frame_msg(image, stamp, frame_id="camera") -> Image:
    msg = array_to_image_msg(image)
    msg.header.stamp, msg.header.frame_id = stamp, frame_id
    return msg


class Driver:
    """The test's side: publishes frames, collects every output by topic."""

    def __init__(self, node, executor, namespace: str, stereo: bool, vins: bool):
        self.node, self.executor, self.ns = node, executor, namespace
        qos = output_qos()
        if stereo:
            self.image_pubs = {side: node.create_publisher(Image, f"{namespace}/{side}/image_rect", qos)
                               for side in ("left", "right")}
            self.info_pubs = {side: node.create_publisher(CameraInfo, f"{namespace}/{side}/camera_info", 10)
                              for side in ("left", "right")}
        else:
            self.image_pubs = {"mono": node.create_publisher(Image, f"{namespace}/image", qos)}
            self.info_pubs = {"mono": node.create_publisher(CameraInfo, f"{namespace}/camera_info", 10)}
        self.out = {}
        topics = {"keypoints": Keypoints, "matches": Matches, "tracks": Tracks}
        if vins:
            topics["frontend_node/feature"] = PointCloud
        if stereo:
            topics.update({"right/keypoints": Keypoints, "stereo_matches": StereoMatches})
        self.subs = [node.create_subscription(kind, f"{namespace}/{topic}",
                                              self.out.setdefault(topic, []).append, qos)
                     for topic, kind in topics.items()]
        self.diagnostics = {}
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.published = 0

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            self.diagnostics[status.name.split(":")[0]] = {kv.key: kv.value for kv in status.values}

    def status(self) -> dict:
        return self.diagnostics.get(f"{self.ns}/frontend_node", {})

    def wait_ready(self, timeout=120.0) -> bool:
        ready = spin_until(self.executor, lambda: all(p.get_subscription_count() for p in self.image_pubs.values())
                           and all(s.get_publisher_count() for s in self.subs) and self.status(), timeout)
        spin_until(self.executor, lambda: False, 1.0)  # the publications' announcements settle
        return ready

    def tracks_for(self, stamp, timeout=60.0):
        def find():
            return next((m for m in self.out["tracks"] if m.header.stamp == stamp), None)
        spin_until(self.executor, lambda: find() is not None, timeout)
        spin_until(self.executor, lambda: False, 0.2)  # the other outputs of the frame
        return find()

    def of(self, topic, stamp):
        return next((m for m in self.out[topic] if m.header.stamp == stamp), None)

    def feed(self, image, seconds: float, right=None, tx=-FX * BASELINE):
        """One frame (or pair), then its Tracks."""
        stamp = to_time(seconds)
        if right is None:
            self.info_pubs["mono"].publish(camera_info(stamp, "camera", 0.0))
            spin_until(self.executor, lambda: False, 0.05)
            self.image_pubs["mono"].publish(frame_msg(image, stamp))
        else:
            self.info_pubs["left"].publish(camera_info(stamp, "left", 0.0))
            self.info_pubs["right"].publish(camera_info(stamp, "right", tx))
            spin_until(self.executor, lambda: False, 0.05)
            self.image_pubs["left"].publish(frame_msg(image, stamp, "left"))
            self.image_pubs["right"].publish(frame_msg(right, stamp, "right"))
        self.published += 1
        return self.tracks_for(stamp)

    def wait_status(self, predicate, timeout=30.0) -> dict:
        spin_until(self.executor, lambda: predicate(self.status()), timeout)
        return self.status()


@contextlib.contextmanager
def frontend(namespace, log, models: dict, stereo=False, **params):
    process = start_node("frontend_node", namespace=namespace, log_path=log,
                         params={**PARAMS, **{f"{k}_model": str(v) for k, v in models.items()},
                                 "stereo": stereo, **params})
    try:
        with ros_node(f"{namespace.strip('/')}_driver") as (node, executor):
            driver = Driver(node, executor, namespace, stereo,
                            params.get("vins_layout", "none") != "none")
            assert driver.wait_ready(), f"node never came up:\n{log.read_text()}"
            yield driver, process
    finally:
        stop_node(process)


def shifted(i: int, seed=5):
    """Frame i of a camera whose content moves 8 px per frame (EfficientLoFTR's coarse
    cell: random weights then find true matches)."""
    return synthetic_frame(HEIGHT, WIDTH, seed=seed, shift=(8 * i, 0))


def check_tracks_follow(older, newer) -> int:
    """Tracks of consecutive frames are consistent; the number linked."""
    a, b = tracks_from_msg(older), tracks_from_msg(newer)
    linked = np.flatnonzero(b["previous_index"] >= 0)
    np.testing.assert_array_equal(b["ids"][linked], a["ids"][b["previous_index"][linked]])
    np.testing.assert_array_equal(b["lengths"][linked], a["lengths"][b["previous_index"][linked]] + 1)
    return len(linked)


def check_vins_cloud(cloud, tracks, layout: str) -> None:
    """The cloud parses as the estimator reads it (test_vins' ports of its callback): one
    left point per track at its pixel, normalised by the (undistorted) camera, velocity 0
    for a new track; fusion: a camera-1 point per track with a right observation."""
    from test_vins import parse_vins_fusion, parse_vins_mono
    assert cloud is not None and cloud.header == tracks.header
    parsed = parse_vins_fusion(cloud) if layout == "fusion" else parse_vins_mono(cloud, 1)
    fields = tracks_from_msg(tracks)
    assert sorted(parsed) == sorted(int(i) for i in fields["ids"])
    for i, track_id in enumerate(fields["ids"].tolist()):
        observations = dict(parsed[track_id])
        x, y, z, u, v, vx, vy = observations[0]
        assert (u, v) == tuple(fields["keypoints"][i].tolist())
        np.testing.assert_allclose([x, y], [(u - WIDTH / 2) / FX, (v - HEIGHT / 2) / FX], atol=1e-5)
        if fields["previous_index"][i] < 0:
            assert vx == vy == 0.0
        right = fields["keypoints_right"][i] if len(fields["keypoints_right"]) else None
        if right is not None and np.isfinite(right).all():
            assert tuple(observations[1][3:5]) == tuple(right.tolist())
        else:
            assert 1 not in observations


def test_mono_eloftr_outputs_per_frame_tracks_link_bad_input_counted(
        tiny_superpoint_dir, tiny_eloftr_dir, tmp_path):
    log = tmp_path / "node.log"
    models = {"superpoint": tiny_superpoint_dir, "eloftr": tiny_eloftr_dir}
    with frontend("/fe_mono", log, models, vins_layout="mono") as (driver, process):
        tracks = [driver.feed(shifted(i), 100.0 + 0.1 * i) for i in range(4)]
        assert all(t is not None for t in tracks), log.read_text()
        linked = 0
        for i, t in enumerate(tracks):
            keypoints = driver.of("keypoints", t.header.stamp)
            assert keypoints is not None and np.array_equal(keypoints.x, t.x) and np.array_equal(keypoints.y, t.y)
            assert len(t.x_right) == len(t.depth) == 0  # mono: no stereo fields
            matches = driver.of("matches", t.header.stamp)
            assert (matches is None) == (i == 0)
            if i:
                assert matches.stamp0 == tracks[i - 1].header.stamp
                assert len(matches_from_msg(matches)["index0"]) == 0  # dense: no indices
                linked += check_tracks_follow(tracks[i - 1], t)
        assert (tracks_from_msg(tracks[0])["previous_index"] == -1).all()
        for t in tracks:  # the feature cloud as VINS-Mono's estimator_node reads it
            check_vins_cloud(driver.of("frontend_node/feature", t.header.stamp), t, "mono")
        assert linked > 0, "8 px shifts: random-init EfficientLoFTR matches link some tracks"
        # Bad input: counted as rejected, the node lives on and the stream continues.
        driver.image_pubs["mono"].publish(Image(height=8, width=8, encoding="bgr8", step=20,
                                                data=bytes(160)))
        driver.published += 1
        status = driver.wait_status(lambda s: s.get("rejected") == "1")
        assert status["rejected"] == "1", status
        after = driver.feed(shifted(4), 100.4)
        assert driver.of("matches", after.header.stamp).stamp0 == tracks[-1].header.stamp
        # Runtime parameters: checked in on_set, applied in post_set; fixed ones refused.
        from rclpy.parameter import Parameter
        from rcl_interfaces.srv import SetParameters
        client = driver.node.create_client(SetParameters, "/fe_mono/frontend_node/set_parameters")
        assert client.wait_for_service(timeout_sec=10)
        results = []
        for values in ({"association_radius": 4.0, "max_keypoints": 64}, {"matcher": "lightglue"},
                       {"min_disparity": 300.0}, {"association_radius": 0.0}):
            future = client.call_async(SetParameters.Request(parameters=[
                Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]))
            spin_until(driver.executor, future.done, 10)
            results.append(future.result().results)
        assert all(r.successful for r in results[0])
        assert not results[1][0].successful and "cannot change while running" in results[1][0].reason
        assert not results[2][0].successful and "min_disparity" in results[2][0].reason
        assert not results[3][0].successful
        smaller = driver.feed(shifted(5), 100.5)
        assert 0 < len(smaller.x) <= 64
        stop_node(process)
    text = log.read_text()
    counts = parse_counters(text)
    assert counts == {"received": driver.published, "processed": driver.published - 1,
                      "dropped": 0, "rejected": 1}, counts
    assert "Traceback" not in text and "tracks published 6" in text, text


def test_mono_lightglue_links_tracks_by_keypoint_index(tiny_superpoint_dir, tmp_path):
    from kp_ros.core.random_init import save_random_lightglue
    lightglue = save_random_lightglue(tmp_path / "lightglue", "tiny", seed=0)
    log = tmp_path / "node.log"
    with frontend("/fe_lg", log, {"superpoint": tiny_superpoint_dir, "lightglue": lightglue},
                  matcher="lightglue") as (driver, _):
        tracks = [driver.feed(shifted(i), 100.0 + 0.1 * i) for i in range(3)]
        assert all(t is not None for t in tracks), log.read_text()
        for i in (1, 2):
            found = matches_from_msg(driver.of("matches", tracks[i].header.stamp))
            assert len(found["index0"]) > 0
            previous = tracks_from_msg(tracks[i])["previous_index"]
            np.testing.assert_array_equal(previous[found["index1"]], found["index0"])
            assert check_tracks_follow(tracks[i - 1], tracks[i]) == len(found["index0"])


def test_stereo_disparity_depth_and_unpaired_frames(tiny_superpoint_dir, tiny_eloftr_dir, tmp_path):
    log = tmp_path / "node.log"
    models = {"superpoint": tiny_superpoint_dir, "eloftr": tiny_eloftr_dir}
    with frontend("/fe_st", log, models, stereo=True, vins_layout="fusion") as (driver, process):
        results = []
        for i in range(2):
            left = synthetic_frame(HEIGHT, WIDTH, seed=3, shift=(8 * i, 0))
            right = synthetic_frame(HEIGHT, WIDTH, seed=3, shift=(8 * i + DISPARITY, 0))
            results.append(driver.feed(left, 100.0 + 0.1 * i, right))
        assert all(t is not None for t in results), log.read_text()
        for t in results:
            assert t.header.frame_id == "left"
            stereo = driver.of("stereo_matches", t.header.stamp)
            right_kp = driver.of("right/keypoints", t.header.stamp)
            assert stereo is not None and right_kp is not None and right_kp.header.frame_id == "right"
            assert stereo.warning == "" and stereo.focal == FX
            assert abs(stereo.baseline - BASELINE) < 1e-6  # float32 in the message
            found = stereo_matches_from_msg(stereo)
            assert len(found["disparity"]) >= 1  # random weights: few, but true for an exact shift
            np.testing.assert_allclose(found["disparity"], DISPARITY, atol=1.0)
            np.testing.assert_allclose(found["depth"], FX * BASELINE / found["disparity"], rtol=1e-5)
            np.testing.assert_allclose(np.median(found["depth"]), FX * BASELINE / DISPARITY, rtol=0.07)
            fields = tracks_from_msg(t)
            assert fields["keypoints_right"].shape == (len(t.x), 2) and len(fields["depth"]) == len(t.x)
            known = np.isfinite(fields["depth"])
            assert np.isnan(fields["keypoints_right"][~known]).all()
            check_vins_cloud(driver.of("frontend_node/feature", t.header.stamp), t, "fusion")
        assert driver.of("matches", results[1].header.stamp).stamp0 == results[0].header.stamp
        # A left frame whose right one never comes: counted as unpaired on /diagnostics.
        driver.image_pubs["left"].publish(frame_msg(synthetic_frame(HEIGHT, WIDTH, seed=3), to_time(100.25), "left"))
        driver.feed(synthetic_frame(HEIGHT, WIDTH, seed=3, shift=(16, 0)), 100.3,
                    synthetic_frame(HEIGHT, WIDTH, seed=3, shift=(16 + DISPARITY, 0)))
        status = driver.wait_status(lambda s: s.get("left_dropped_unpaired") == "1")
        assert status["left_dropped_unpaired"] == "1" and status["pairs"] == "3", status
        stop_node(process)
    counts = parse_counters(log.read_text())
    assert counts == {"received": 3, "processed": 3, "dropped": 0, "rejected": 0}, counts


def test_stereo_tracks_carry_right_position_and_depth_in_the_node(tiny_superpoint_dir, tiny_eloftr_dir):
    """The node object with hand-made EfficientLoFTR features: most tracks get the right
    keypoint 16 px to the left and a depth of 1.875 m, and link across pairs."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from kp_ros.nodes.frontend_node import FrontendNode
    from test_eloftr_correctness import HandMadeFeatureMatcher

    context = rclpy.Context()
    rclpy.init(context=context)
    overrides = {**PARAMS, "superpoint_model": str(tiny_superpoint_dir), "eloftr_model": str(tiny_eloftr_dir),
                 "stereo": True, "match_threshold": 0.05, "association_radius": 3.0}
    node = FrontendNode(context=context, namespace="/fe_oracle",
                        parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    node.matcher.__class__ = HandMadeFeatureMatcher  # its learned stages swapped for hand-made ones
    driver = rclpy.create_node("oracle_driver", context=context)
    tracks = []
    driver.create_subscription(Tracks, "/fe_oracle/tracks", tracks.append, output_qos())
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(driver)
    executor.add_node(node)
    try:
        node.start()
        node.input._on_info("left", camera_info(to_time(0.0), "left", 0.0))
        node.input._on_info("right", camera_info(to_time(0.0), "right", -FX * BASELINE))
        for i in range(2):
            stamp = to_time(100.0 + 0.1 * i)
            node.input.on_image("left", frame_msg(synthetic_frame(HEIGHT, WIDTH, seed=3, shift=(8 * i, 0)), stamp))
            node.input.on_image("right", frame_msg(
                synthetic_frame(HEIGHT, WIDTH, seed=3, shift=(8 * i + DISPARITY, 0)), stamp))
            assert node.worker.wait_idle(60)
        assert spin_until(executor, lambda: len(tracks) == 2, 10)
        for t in tracks:
            fields = tracks_from_msg(t)
            known = np.isfinite(fields["depth"])
            assert known.sum() >= 5
            disparity = fields["keypoints"][known, 0] - fields["keypoints_right"][known, 0]
            assert np.median(np.abs(disparity - DISPARITY)) < 1.0
            np.testing.assert_allclose(np.median(fields["depth"][known]), FX * BASELINE / DISPARITY, rtol=0.05)
        assert check_tracks_follow(tracks[0], tracks[1]) >= 10
    finally:
        node.shutdown()
        executor.shutdown()
        node.destroy_node()
        driver.destroy_node()
        rclpy.shutdown(context=context)


def test_stereo_with_lightglue_is_refused_at_start():
    import subprocess
    import sys

    from ros_helpers import node_env
    result = subprocess.run([sys.executable, "-m", "kp_ros.nodes.frontend_node", "--ros-args",
                             "-p", "device:=cpu", "-p", "stereo:=true", "-p", "matcher:=lightglue"],
                            env=node_env(), capture_output=True, text=True, timeout=120)
    text = result.stdout + result.stderr
    assert result.returncode == 1, text
    assert "cannot start: stereo: true needs matcher: eloftr" in text and "Traceback" not in text, text
