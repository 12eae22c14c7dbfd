"""The VINS feature cloud parsed the way each estimator's callback parses it (their loops
ported below), field by field against the tracks: core (kp_ros.core.vins), the rclpy
message (kp_ros.ros.vins_cloud), and the ~/feature a real track_node publishes."""
from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from kp_ros.core.geometry import camera_from_info
from kp_ros.core.vins import VinsFeatures

K = np.array([[400.0, 0.0, 320.0], [0.0, 410.0, 240.0], [0.0, 0.0, 1.0]])
D = np.array([-0.2, 0.05, 0.001, -0.002, 0.01])  # plumb_bob k1 k2 p1 p2 k3
K_RIGHT = np.array([[400.0, 0.0, 300.0], [0.0, 410.0, 240.0], [0.0, 0.0, 1.0]])
D_RIGHT = np.array([-0.1, 0.02, 0.0, 0.001, 0.0])
CAMERA = camera_from_info(K.ravel(), D, "plumb_bob", 640, 480)
CAMERA_RIGHT = camera_from_info(K_RIGHT.ravel(), D_RIGHT, "plumb_bob", 640, 480)
EXACT = 1 << 24  # float32 holds every integer below this


# --- the estimators' parsing, ported ------------------------------------------------------

def parse_vins_fusion(msg) -> dict:
    """VINS-Fusion vins_estimator/src/rosNodeTest.cpp, feature_callback: the loop, line by
    line (C++ int() of a float truncates, as Python's int() does for these values; an index
    past the end of channels, undefined behaviour there, is an IndexError here)."""
    feature_frame = {}
    for i in range(len(msg.points)):
        feature_id = int(msg.channels[0].values[i])
        camera_id = int(msg.channels[1].values[i])
        x, y, z = msg.points[i].x, msg.points[i].y, msg.points[i].z
        p_u = msg.channels[2].values[i]
        p_v = msg.channels[3].values[i]
        velocity_x = msg.channels[4].values[i]
        velocity_y = msg.channels[5].values[i]
        if len(msg.channels) > 5:
            gx = msg.channels[6].values[i]
            gy = msg.channels[7].values[i]
            gz = msg.channels[8].values[i]
            assert (gx, gy, gz) == (0, 0, 0)
        assert z == 1  # ROS_ASSERT(z == 1)
        feature_frame.setdefault(feature_id, []).append(
            (camera_id, (x, y, z, p_u, p_v, velocity_x, velocity_y)))
    # estimator/feature_manager.cpp, addFeatureCheckParallax: the first observation of an
    # id is camera 0, a second one camera 1.
    for observations in feature_frame.values():
        assert observations[0][0] == 0 and len(observations) <= 2
        if len(observations) == 2:
            assert observations[1][0] == 1
    return feature_frame


def parse_vins_mono(msg, num_of_cam: int) -> dict:
    """VINS-Mono vins_estimator/src/estimator_node.cpp, process(): the feature loop."""
    image = {}
    for i in range(len(msg.points)):
        v = int(msg.channels[0].values[i] + 0.5)
        feature_id = v // num_of_cam
        camera_id = v % num_of_cam
        x, y, z = msg.points[i].x, msg.points[i].y, msg.points[i].z
        p_u = msg.channels[1].values[i]
        p_v = msg.channels[2].values[i]
        velocity_x = msg.channels[3].values[i]
        velocity_y = msg.channels[4].values[i]
        assert z == 1  # ROS_ASSERT(z == 1)
        image.setdefault(feature_id, []).append((camera_id, (x, y, z, p_u, p_v, velocity_x, velocity_y)))
    return image


def as_msg(cloud) -> SimpleNamespace:
    """A VinsCloud with a PointCloud's attributes (points[i].x, channels[c].values[i])."""
    points = [SimpleNamespace(x=float(x), y=float(y), z=float(z)) for x, y, z in cloud.points]
    return SimpleNamespace(points=points, channels=[SimpleNamespace(name=n, values=v.tolist())
                                                    for n, v in zip(cloud.channel_names, cloud.channels)])


def undistorted(pixels, K=K, D=D) -> np.ndarray:
    return cv2.undistortPoints(np.asarray(pixels, np.float64).reshape(-1, 1, 2), K, D).reshape(-1, 2)


# Two frames 50 ms apart: track 9 and 12 continue, 5 ends, 20 is new; in the right camera
# 9 is seen in both, 12 only in the second (its first right sight), 20 never.
T0, T1 = 10_000_000_000, 10_050_000_000
IDS0, PIX0 = [5, 9, 12], np.array([[100.0, 80.0], [320.0, 240.0], [500.0, 400.0]])
IDS1, PIX1 = [9, 12, 20], np.array([[326.0, 237.0], [495.5, 404.0], [50.0, 60.0]])
RIGHT0 = np.array([[90.0, 80.0], [300.0, 240.0], [np.nan, np.nan]])
RIGHT1 = np.array([[305.0, 237.0], [470.0, 404.0], [np.nan, np.nan]])


def expected_velocity(p0, p1, K=K, D=D, dt=(T1 - T0) * 1e-9) -> np.ndarray:
    return (undistorted([p1], K, D) - undistorted([p0], K, D))[0] / dt


def check_observation(obs, pixel, velocity, K=K, D=D):
    x, y, z, u, v, vx, vy = obs
    assert z == 1
    assert np.allclose((x, y), undistorted([pixel], K, D)[0], atol=1e-6)
    assert (u, v) == tuple(np.float32(pixel))
    assert np.allclose((vx, vy), velocity, rtol=1e-4, atol=1e-5)


def fusion_frames(features):
    first = features.frame(T0, IDS0, PIX0, CAMERA, RIGHT0, CAMERA_RIGHT)
    second = features.frame(T1, IDS1, PIX1, CAMERA, RIGHT1, CAMERA_RIGHT)
    return first, second


def check_fusion_second_frame(parsed):
    assert sorted(parsed) == [9, 12, 20]
    assert [c for c, _ in parsed[9]] == [0, 1] and [c for c, _ in parsed[12]] == [0, 1]
    assert [c for c, _ in parsed[20]] == [0]
    check_observation(parsed[9][0][1], PIX1[0], expected_velocity(PIX0[1], PIX1[0]))
    check_observation(parsed[12][0][1], PIX1[1], expected_velocity(PIX0[2], PIX1[1]))
    check_observation(parsed[20][0][1], PIX1[2], (0, 0))  # new track
    check_observation(parsed[9][1][1], RIGHT1[0],
                      expected_velocity(RIGHT0[1], RIGHT1[0], K_RIGHT, D_RIGHT), K_RIGHT, D_RIGHT)
    check_observation(parsed[12][1][1], RIGHT1[1], (0, 0), K_RIGHT, D_RIGHT)  # first right sight


# --- core -------------------------------------------------------------------------------

def test_fusion_cloud_parses_as_vins_fusion_reads_it():
    first, second = fusion_frames(VinsFeatures("fusion", num_cameras=2))
    assert first.channels.shape[0] == 9 and second.channels.shape[0] == 9
    assert first.channel_names[:6] == ("feature_id", "camera_id", "u", "v", "velocity_x", "velocity_y")
    assert first.points.dtype == np.float32 and first.channels.dtype == np.float32
    assert not first.channels[6:].any()
    parsed0 = parse_vins_fusion(as_msg(first))
    assert sorted(parsed0) == [5, 9, 12]
    assert all(obs[5:] == (0, 0) for observations in parsed0.values() for _, obs in observations)
    check_fusion_second_frame(parse_vins_fusion(as_msg(second)))


def test_a_six_channel_cloud_would_be_read_past_its_end():
    """Why 9 channels: the callback reads channels 6-8 whenever there are more than 5."""
    _, second = fusion_frames(VinsFeatures("fusion", num_cameras=2))
    msg = as_msg(second)
    msg.channels = msg.channels[:6]
    with pytest.raises(IndexError):
        parse_vins_fusion(msg)


@pytest.mark.parametrize("num_of_cam", [1, 2])
def test_mono_cloud_decodes_id_and_camera(num_of_cam):
    features = VinsFeatures("mono", num_cameras=num_of_cam)
    big = [EXACT // num_of_cam - 1, 7, 0]  # the largest id that needs no wrap, a small one, 0
    pixels = np.array([[10.0, 20.0], [30.0, 40.0], [600.0, 470.0]])
    right = np.array([[5.0, 20.0], [np.nan, np.nan], [590.0, 470.0]])
    cloud = features.frame(T0, big, pixels, CAMERA, right, CAMERA_RIGHT)
    assert cloud.channels.shape[0] == 5
    parsed = parse_vins_mono(as_msg(cloud), num_of_cam)
    assert sorted(parsed) == sorted(big)
    for track, pixel, pixel_right in zip(big, pixels, right):
        cameras = [c for c, _ in parsed[track]]
        has_right = num_of_cam == 2 and np.isfinite(pixel_right).all()
        assert cameras == ([0, 1] if has_right else [0])
        check_observation(parsed[track][0][1], pixel, (0, 0))
        if has_right:
            check_observation(parsed[track][1][1], pixel_right, (0, 0), K_RIGHT, D_RIGHT)
    if num_of_cam == 1:
        assert features.counters["right points dropped (num_cameras 1)"] == 2
    moved = features.frame(T1, big, pixels + [2.0, -1.0], CAMERA)
    by_id = parse_vins_mono(as_msg(moved), num_of_cam)
    for track, pixel in zip(big, pixels):
        check_observation(by_id[track][0][1], pixel + [2.0, -1.0],
                          expected_velocity(pixel, pixel + [2.0, -1.0]))


def test_ids_wrap_below_float32_precision():
    fusion = VinsFeatures("fusion", 2).frame(T0, [EXACT - 1, EXACT + 3], PIX0[:2], CAMERA)
    assert sorted(parse_vins_fusion(as_msg(fusion))) == [3, EXACT - 1]
    mono = VinsFeatures("mono", 2).frame(T0, [EXACT // 2 + 5], PIX0[:1], CAMERA, PIX0[:1], CAMERA)
    assert sorted(parse_vins_mono(as_msg(mono), 2)) == [5]


def test_velocity_is_zero_after_reset_or_a_stamp_that_does_not_increase():
    features = VinsFeatures("fusion", 2)
    features.frame(T0, IDS0, PIX0, CAMERA)
    again = features.frame(T0, IDS0, PIX0 + 5, CAMERA)  # the same stamp: a restart
    assert not again.channels[4:6].any()
    moved = features.frame(T1, IDS0, PIX0 + 6, CAMERA)
    assert np.abs(moved.channels[4:6]).min() > 0
    features.reset()
    assert not features.frame(T1 + 10**8, IDS0, PIX0 + 7, CAMERA).channels[4:6].any()


def test_velocity_spans_a_frame_the_track_missed():
    """Velocity from the track's own last sight (and stamp), not the previous frame's."""
    features = VinsFeatures("fusion", 2)
    features.frame(T0, [9], PIX0[1:2], CAMERA)
    features.frame(T1, [30], PIX0[:1], CAMERA)
    t2 = T1 + (T1 - T0)
    cloud = parse_vins_fusion(as_msg(features.frame(t2, [9], PIX1[:1], CAMERA)))
    check_observation(cloud[9][0][1], PIX1[0], expected_velocity(PIX0[1], PIX1[0], dt=(t2 - T0) * 1e-9))


def test_bad_input():
    features = VinsFeatures("fusion", 2)
    with pytest.raises(ValueError, match="camera model"):
        features.frame(T0, IDS0, PIX0, None)
    with pytest.raises(ValueError, match="right camera"):
        features.frame(T0, IDS0, PIX0, CAMERA, RIGHT0)
    with pytest.raises(ValueError):
        VinsFeatures("none")
    with pytest.raises(ValueError):
        VinsFeatures("mono", num_cameras=3)
    # Non-finite pixels are left out, never published as NaN.
    cloud = features.frame(T0, [1, 2], [[np.nan, 3.0], [10.0, 10.0]], CAMERA)
    assert cloud.channels[0].tolist() == [2] and np.isfinite(cloud.points).all()
    assert len(features.frame(T1, [], np.zeros((0, 2)), CAMERA)) == 0


# --- the rclpy message ------------------------------------------------------------------

def test_cloud_to_msg_keeps_every_value():
    from std_msgs.msg import Header
    from kp_ros.ros.vins_cloud import cloud_to_msg
    _, second = fusion_frames(VinsFeatures("fusion", 2))
    header = Header(frame_id="camera")
    msg = cloud_to_msg(header, second)
    assert msg.header.frame_id == "camera" and len(msg.channels) == 9
    assert [c.name for c in msg.channels] == list(second.channel_names)
    assert np.array_equal(np.array([[p.x, p.y, p.z] for p in msg.points], np.float32), second.points)
    assert np.array_equal(np.array([c.values for c in msg.channels], np.float32), second.channels)
    check_fusion_second_frame(parse_vins_fusion(msg))


def camera_info_msg(K_=K, D_=D, P=None):
    from sensor_msgs.msg import CameraInfo
    info = CameraInfo(width=640, height=480, distortion_model="plumb_bob")
    info.k, info.d = K_.ravel().tolist(), D_.tolist()
    info.p = (P if P is not None else np.hstack([K_, np.zeros((3, 1))])).ravel().tolist()
    return info


def tracks_message(stamp_ns, ids, pixels, right=None):
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header
    from kp_ros.core.tracks import FrameTracks
    from kp_ros.ros.conversions import tracks_to_msg
    n = len(ids)
    tracks = FrameTracks(stamp_ns, np.asarray(pixels, np.float32), np.asarray(ids, np.uint64),
                         np.ones(n, np.uint32), np.full(n, -1, np.int32))
    header = Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id="camera")
    return tracks_to_msg(header, 480, 640, tracks, right, None if right is None else np.ones(n, np.float32))


def test_vins_output_counts_missing_calibration_and_adds_right_points():
    """The node side in-process: stereo Tracks (x_right / y_right) -> camera-1 points."""
    from sensor_msgs.msg import PointCloud
    from kp_ros.ros.vins_cloud import VinsOutput
    from ros_helpers import ros_node, spin_until
    with ros_node("vins_output_test") as (node, executor):
        output = VinsOutput(node, "fusion")
        clouds = []
        node.create_subscription(PointCloud, output.publisher.topic_name, clouds.append, 10)
        assert spin_until(executor, lambda: output.publisher.get_subscription_count() >= 1, 10)
        msg0 = tracks_message(T0, IDS0, PIX0, RIGHT0)
        output.publish(msg0, PIX0)
        assert output.counts["vins no camera_info"] == 1 and not output.counts["vins published"]
        output.left.on_info(camera_info_msg())
        output.publish(msg0, PIX0)
        assert output.counts["vins no right camera_info"] == 1  # left points only
        output.right.on_info(camera_info_msg(K_RIGHT, D_RIGHT))
        output.right.on_info(camera_info_msg(K_RIGHT, np.array([np.nan] * 5)))  # unusable: counted
        assert output.counts["vins bad right camera_info"] == 1 and output.right.camera is None
        output.right.on_info(camera_info_msg(K_RIGHT, D_RIGHT))
        output.features.reset()
        output.publish(tracks_message(T0, IDS0, PIX0, RIGHT0), PIX0)
        output.publish(tracks_message(T1, IDS1, PIX1, RIGHT1), PIX1)
        assert output.counts["vins published"] == 3
        assert spin_until(executor, lambda: len(clouds) == 3, 10)
        assert clouds[-1].header.stamp.nanosec == T1 % 10**9
        check_fusion_second_frame(parse_vins_fusion(clouds[-1]))


# --- a real track_node ------------------------------------------------------------------

class NodeDriver:
    """Keypoints / Matches / CameraInfo into a track_node, its Tracks and ~/feature out."""

    def __init__(self, node, executor, ns: str):
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import CameraInfo, PointCloud
        from kp_ros.msg import Keypoints, Matches, Tracks
        from kp_ros.ros.qos import output_qos
        self.node, self.executor, self.ns = node, executor, ns
        self.kp_pub = node.create_publisher(Keypoints, f"{ns}/keypoints", output_qos())
        self.match_pub = node.create_publisher(Matches, f"{ns}/matches", output_qos())
        self.info_pub = node.create_publisher(CameraInfo, f"{ns}/camera_info", 10)
        self.tracks, self.clouds, self.diagnostics = [], [], {}
        self.tracks_sub = node.create_subscription(Tracks, f"{ns}/tracks", self.tracks.append, output_qos())
        self.cloud_sub = node.create_subscription(PointCloud, f"{ns}/track_node/feature",
                                                  self.clouds.append, output_qos())
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)

    def _on_diag(self, msg):
        for status in msg.status:
            if status.name.startswith(f"{self.ns}/track_node:"):
                self.diagnostics = {kv.key: kv.value for kv in status.values}

    def header(self, stamp_ns: int):
        from builtin_interfaces.msg import Time
        from std_msgs.msg import Header
        return Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id="camera")

    def keypoints(self, stamp_ns: int, xy) -> None:
        from kp_ros.ros.conversions import keypoints_to_msg
        xy = np.asarray(xy, np.float32)
        self.kp_pub.publish(keypoints_to_msg(self.header(stamp_ns), 480, 640, "test", xy, np.ones(len(xy))))

    def matches(self, stamp_ns: int, stamp0_ns: int, xy0, xy1) -> None:
        from kp_ros.ros.conversions import matches_to_msg
        xy0, xy1 = np.asarray(xy0, np.float32), np.asarray(xy1, np.float32)
        self.match_pub.publish(matches_to_msg(self.header(stamp_ns), self.header(stamp0_ns).stamp, "camera",
                                              480, 640, "test", xy0, xy1, np.ones(len(xy0), np.float32)))

    def wait(self, found: list, stamp_ns: int, timeout: float = 10.0):
        def find():
            return next((m for m in found if m.header.stamp == self.header(stamp_ns).stamp), None)
        from ros_helpers import spin_until
        spin_until(self.executor, lambda: find() is not None, timeout)
        return find()


@pytest.fixture(scope="module", params=["fusion", "mono"])
def vins_node(request, tmp_path_factory):
    from ros_helpers import ros_node, spin_until, start_node, stop_node
    layout = request.param
    ns = f"/vins_{layout}"
    log = tmp_path_factory.mktemp(f"vins_{layout}") / "node.log"
    process = start_node("track_node", namespace=ns, log_path=log, params_file=None,
                         params={"vins_layout": layout, "match_timeout": 0.5, "diagnostics_period": 0.2})
    with ros_node(f"vins_{layout}_driver") as (node, executor):
        driver = NodeDriver(node, executor, ns)
        ready = spin_until(executor, lambda: (
            driver.kp_pub.get_subscription_count() >= 1 and driver.info_pub.get_subscription_count() >= 1
            and driver.cloud_sub.get_publisher_count() >= 1 and driver.diagnostics), 60)
        assert ready, f"node never came up:\n{log.read_text()}"
        spin_until(executor, lambda: False, 1.0)  # discovery settles both ways (see ros_helpers)
        yield layout, driver, log
        stop_node(process)


def test_track_node_feature_cloud_parses_as_the_estimator_reads_it(vins_node):
    from ros_helpers import spin_until
    from kp_ros.ros.conversions import tracks_from_msg
    layout, driver, log = vins_node
    # Before any CameraInfo: Tracks as always, no cloud, counted.
    driver.keypoints(T0, PIX0)
    assert driver.wait(driver.tracks, T0) is not None, log.read_text()
    assert spin_until(driver.executor, lambda: int(driver.diagnostics.get("vins no camera_info", 0)) >= 1, 10)
    assert not driver.clouds

    driver.info_pub.publish(camera_info_msg())
    spin_until(driver.executor, lambda: False, 1.0)
    t1, t2 = T0 + 10**9, T0 + 10**9 + (T1 - T0)
    first, second = PIX0, np.vstack([PIX0[1:] + [6.0, -3.0], [[50.0, 60.0]]])  # 2 linked, 1 new
    driver.keypoints(t1, first)
    driver.keypoints(t2, second)
    driver.matches(t2, t1, first[1:], second[:2])
    tracks1, tracks2 = driver.wait(driver.tracks, t1), driver.wait(driver.tracks, t2)
    cloud1, cloud2 = driver.wait(driver.clouds, t1), driver.wait(driver.clouds, t2)
    assert cloud1 is not None and cloud2 is not None, log.read_text()
    a, b = tracks_from_msg(tracks1), tracks_from_msg(tracks2)
    assert b["previous_index"].tolist() == [1, 2, -1]
    assert cloud2.header.frame_id == "camera"
    if layout == "fusion":
        assert len(cloud2.channels) == 9
        parsed = parse_vins_fusion(cloud2)
    else:
        assert len(cloud2.channels) == 5
        parsed = parse_vins_mono(cloud2, 1)
    assert sorted(parsed) == sorted(int(i) for i in b["ids"])
    for k, track in enumerate(b["ids"]):
        (camera_id, obs), = parsed[int(track)]
        assert camera_id == 0
        previous = b["previous_index"][k]
        velocity = expected_velocity(a["keypoints"][previous], b["keypoints"][k], dt=(t2 - t1) * 1e-9) \
            if previous >= 0 else (0, 0)
        check_observation(obs, b["keypoints"][k], velocity)
    assert int(driver.diagnostics.get("vins no camera_info", 0)) == 1
    assert spin_until(driver.executor, lambda: int(driver.diagnostics.get("vins published", 0)) >= 2, 10)
