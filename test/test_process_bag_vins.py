"""process_bag --vins: a <prefix>/feature cloud per Tracks, parsed as VINS-Fusion /
VINS-Mono read it (test_vins.py's ports) and checked against the Tracks beside it, from a
mono bag and a stereo bag (camera-1 points from the right CameraInfo); byte-identical
across runs; a clear error without a CameraInfo."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from kp_ros.bags.reader import BagError
from kp_ros.core.tracks import TrackParams
from kp_ros.offline import process_bag_cli as pb
from kp_ros.offline.stereo_bag import process_stereo_bag
from test_process_bag import T0, frames, image_bag, models, one_thread, read_outputs  # noqa: F401
from test_process_bag_tracks import add_camera_info
from test_vins import parse_vins_fusion, parse_vins_mono

K = np.array([[120.0, 0, 80], [0, 120.0, 64], [0, 0, 1]])
D = np.array([-0.1, 0.01, 0, 0, 0])  # add_camera_info's
TRACKS = TrackParams(association_radius=8.0, inliers_only=False)


def stamp_of(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def check_clouds(clouds, tracks, layout, K_left=K, D_left=D, K_right=None, D_right=None):
    """Every cloud against its Tracks (same stamp): ids, cameras, u/v, undistorted points,
    velocities (from the previous Tracks where linked, 0 where new)."""
    assert len(clouds) == len(tracks) and clouds
    linked_total = right_total = right_linked = 0
    previous = None
    for (_, cloud, _), (_, track, _) in zip(clouds, tracks):
        assert cloud.header == track.header
        parsed = parse_vins_fusion(cloud) if layout == "fusion" else parse_vins_mono(cloud, 1)
        assert sorted(parsed) == sorted(int(i) for i in track.ids)
        xy = np.stack([track.x, track.y], 1)
        normalised = cv2.undistortPoints(xy.reshape(-1, 1, 2).astype(np.float64), K_left, D_left).reshape(-1, 2)
        stereo = K_right is not None and len(track.x_right)
        if stereo:
            right_xy = np.stack([track.x_right, track.y_right], 1)
            seen = np.isfinite(right_xy).all(1)
            right_norm = np.full_like(right_xy, np.nan, dtype=np.float64)
            right_norm[seen] = cv2.undistortPoints(right_xy[seen].reshape(-1, 1, 2).astype(np.float64),
                                                   K_right, D_right).reshape(-1, 2)
        for k, track_id in enumerate(track.ids):
            observations = parsed[int(track_id)]
            assert [c for c, _ in observations] == ([0, 1] if stereo and seen[k] else [0])
            x, y, z, u, v, vx, vy = observations[0][1]
            assert z == 1 and (u, v) == (track.x[k], track.y[k])
            np.testing.assert_allclose((x, y), normalised[k], atol=1e-6)
            j = track.previous_index[k]
            if j < 0:
                assert (vx, vy) == (0, 0)
            else:
                dt = (stamp_of(track) - stamp_of(previous[0])) * 1e-9
                np.testing.assert_allclose((vx, vy), (normalised[k] - previous[1][j]) / dt, rtol=1e-4, atol=1e-5)
                linked_total += 1
            if stereo and seen[k]:
                right_total += 1
                x, y, z, u, v, vx, vy = observations[1][1]
                assert z == 1 and (u, v) == (track.x_right[k], track.y_right[k])
                np.testing.assert_allclose((x, y), right_norm[k], atol=1e-6)
                if j >= 0 and np.isfinite(previous[2][j]).all():
                    dt = (stamp_of(track) - stamp_of(previous[0])) * 1e-9
                    np.testing.assert_allclose((vx, vy), (right_norm[k] - previous[2][j]) / dt,
                                               rtol=1e-4, atol=1e-5)
                    right_linked += 1
                elif j < 0:
                    assert (vx, vy) == (0, 0)
        previous = (track, normalised, right_norm if stereo else None)
    assert linked_total > 0
    return right_total, right_linked


@pytest.mark.parametrize("layout", ["fusion", "mono"])
def test_mono_bag_feature_clouds_match_the_tracks(tmp_path, models, layout):  # noqa: F811
    with_info = add_camera_info(image_bag(tmp_path / "in", frames(4)))
    summary = pb.process_bag(with_info, tmp_path / "out", *models, tracks=TRACKS, vins=layout)
    out = read_outputs(tmp_path / "out")
    clouds, tracks = out["/cam/feature"], out["/cam/tracks"]
    assert summary.vins_msgs == len(clouds) == 4 and "vins feature" in summary.text()
    assert all(len(c.channels) == (9 if layout == "fusion" else 5) for _, c, _ in clouds)
    check_clouds(clouds, tracks, layout)


def test_missing_camera_info_is_a_clear_error(tmp_path, models, capsys):  # noqa: F811
    image_bag(tmp_path / "in", frames(2))
    with pytest.raises(BagError, match="--vins fusion needs a sensor_msgs/msg/CameraInfo on /cam/camera_info"):
        pb.process_bag(tmp_path / "in", tmp_path / "out", *models, tracks=TRACKS, vins="fusion")
    assert not (tmp_path / "out").exists()
    assert pb.main(["--vins", "mono", "--no-matcher", str(tmp_path / "in"), str(tmp_path / "o")]) == pb.EXIT_INPUT
    assert "--vins needs both" in capsys.readouterr().err


def test_calibration_of_another_size_gives_no_cloud_and_is_counted(tmp_path, models):  # noqa: F811
    with_info = add_camera_info(image_bag(tmp_path / "in", frames(2, 96, 128)))
    summary = pb.process_bag(with_info, tmp_path / "out", *models, tracks=TRACKS, vins="fusion")
    assert summary.vins_msgs == 0 and summary.vins_skipped == 2
    assert read_outputs(tmp_path / "out")["/cam/feature"] == []


def test_cli_vins_is_deterministic_and_implies_tracks(tmp_path, tiny_superpoint_dir, tiny_eloftr_dir):
    with_info = add_camera_info(image_bag(tmp_path / "in", frames(3)))
    raws = []
    for name in ("a", "b"):
        argv = ["--superpoint-model", str(tiny_superpoint_dir), "--eloftr-model", str(tiny_eloftr_dir),
                "--device", "cpu", "--resize", "native", "--match-threshold", "0", "--max-keypoints", "64",
                "--threads", "1", "--no-progress", "--params-file", "none", "--vins", "fusion",
                "--association-radius", "8", str(with_info), str(tmp_path / name)]
        assert pb.main(argv) == 0
        out = read_outputs(tmp_path / name)
        assert len(out["/cam/tracks"]) == 3
        raws.append([raw for _, _, raw in out["/cam/feature"]])
    assert len(raws[0]) == 3 and raws[0] == raws[1]


# --- stereo ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stereo_models(tiny_superpoint_dir, tiny_eloftr_dir):
    """test_stereo_bag's: hand-made EfficientLoFTR features (random weights find ~3 stereo matches)."""
    from kp_ros.core.superpoint import SuperPointDetector
    from test_eloftr_correctness import HandMadeFeatureMatcher
    detector = SuperPointDetector(str(tiny_superpoint_dir), device="cpu", resize="native", max_keypoints=200)
    matcher = HandMadeFeatureMatcher(str(tiny_eloftr_dir), device="cpu", resize="native", match_threshold=0.05)
    return detector, matcher


@pytest.mark.parametrize("layout", ["fusion", "mono"])
def test_stereo_bag_clouds_carry_the_right_camera(tmp_path, stereo_models, layout):
    from test_stereo_bag import FX, stereo_bag
    stereo_bag(tmp_path / "in", count=3)
    summary = process_stereo_bag(tmp_path / "in", tmp_path / "out", *stereo_models,
                                 tracks=TrackParams(association_radius=8.0), vins=layout)
    out = read_outputs(tmp_path / "out")
    clouds, tracks = out["/stereo/feature"], out["/stereo/tracks"]
    assert summary.vins_msgs == 3
    K_rect = np.array([[FX, 0, 160], [0, FX, 112], [0, 0, 1]])
    if layout == "fusion":
        right, right_linked = check_clouds(clouds, tracks, layout, K_rect, np.zeros(5), K_rect, np.zeros(5))
        assert right >= 15 and right_linked >= 5  # camera-1 points, some with a right velocity
    else:
        assert check_clouds(clouds, tracks, layout, K_rect, np.zeros(5)) == (0, 0)
