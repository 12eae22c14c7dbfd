"""process_bag --stereo on a synthetic stereo bag (image_pipeline's topic names, rectified
camera_info with a baseline): StereoMatches with the known disparity and depth, left and
right Keypoints, left Matches, Tracks with the right observation and depth; unpaired
frames counted; byte-identical outputs from two CLI runs; unrectified input warns."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import synthetic_frame
from kp_ros.bags import messages as bag_messages
from kp_ros.bags import writer as bag_writer
from kp_ros.core.tracks import TrackParams
from kp_ros.offline import process_bag_cli as pb
from kp_ros.offline.stereo_bag import output_prefix, process_stereo_bag
from test_eloftr_correctness import HandMadeFeatureMatcher
from test_process_bag import STEP, T0, TYPESTORE, one_thread, read_outputs  # noqa: F401

HEIGHT, WIDTH, DISPARITY = 224, 320, 16
FX, BASELINE = 300.0, 0.1
INFO = "sensor_msgs/msg/CameraInfo"


def camera_info(stamp: int, frame_id: str, tx: float):
    types = TYPESTORE.types
    return types[INFO](
        header=bag_messages.header_msg(TYPESTORE, stamp, frame_id), height=HEIGHT, width=WIDTH,
        distortion_model="plumb_bob", d=np.zeros(5), k=np.array([FX, 0, 160, 0, FX, 112, 0, 0, 1.0]),
        r=np.eye(3).ravel(), p=np.array([FX, 0, 160, tx, 0, FX, 112, 0, 0, 0, 1, 0], np.float64),
        binning_x=0, binning_y=0,
        roi=types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                      do_rectify=False))


def stereo_bag(path, count=3, tx=-FX * BASELINE, extra_left=()):
    """count stereo pairs at 10 Hz (camera moving 8 px a frame), plus left-only frames at
    the stamps ``extra_left``; camera_info per image, as a driver publishes it."""
    with bag_writer.AtomicBagWriter(path, "sqlite3") as writer:
        conns = {name: writer.add_connection(f"/stereo/{name}", kind, TYPESTORE) for name, kind in (
            ("left/image_rect", bag_messages.IMAGE_TYPE), ("right/image_rect", bag_messages.IMAGE_TYPE),
            ("left/camera_info", INFO), ("right/camera_info", INFO))}
        items = [(T0 + i * STEP, i) for i in range(count)] + [(s, None) for s in extra_left]
        for stamp, i in sorted(items):
            sides = ("left", "right") if i is not None else ("left",)
            for side in sides:
                dx = 8 * (i or 0) + (DISPARITY if side == "right" else 0)
                image = synthetic_frame(HEIGHT, WIDTH, seed=3, shift=(dx, 0))
                header = bag_messages.header_msg(TYPESTORE, stamp, f"{side}_optical")
                msg = bag_messages.image_msg(TYPESTORE, image, "rgb8", header)
                writer.write(conns[f"{side}/image_rect"], stamp + 1000,
                             TYPESTORE.serialize_cdr(msg, bag_messages.IMAGE_TYPE))
                info = camera_info(stamp, f"{side}_optical", tx if side == "right" else 0.0)
                writer.write(conns[f"{side}/camera_info"], stamp + 1000,
                             TYPESTORE.serialize_cdr(info, INFO))
    return path


@pytest.fixture(scope="module")
def models(tiny_superpoint_dir, tiny_eloftr_dir):
    from kp_ros.core.superpoint import SuperPointDetector
    detector = SuperPointDetector(str(tiny_superpoint_dir), device="cpu", resize="native",
                                  max_keypoints=200)
    matcher = HandMadeFeatureMatcher(str(tiny_eloftr_dir), device="cpu", resize="native",
                                     match_threshold=0.05)
    return detector, matcher


def test_stereo_bag_gives_disparity_depth_and_tracks_with_depth(tmp_path, models):
    stereo_bag(tmp_path / "in", count=3, extra_left=[T0 + STEP // 2])
    logged = []
    summary = process_stereo_bag(tmp_path / "in", tmp_path / "out", *models, log=logged.append,
                                 tracks=TrackParams(association_radius=8.0))
    out = read_outputs(tmp_path / "out")
    stereo, tracks = out["/stereo/stereo_matches"], out["/stereo/tracks"]
    assert len(stereo) == len(tracks) == len(out["/stereo/keypoints"]) == 3
    assert len(out["/stereo/right/keypoints"]) == 3 and len(out["/stereo/matches"]) == 2
    assert summary.stereo_msgs == 3 and summary.stereo_unpaired == 1 and not logged
    assert "stereo" in summary.text()
    for _, msg, _ in stereo:
        assert msg.header.stamp == msg.stamp_right and msg.frame_id_right == "right_optical"
        assert msg.warning == "" and msg.focal == FX and msg.baseline == pytest.approx(BASELINE)
        assert len(msg.x_left) >= 20 and msg.candidates >= len(msg.x_left)
        assert np.median(np.abs(msg.disparity - DISPARITY)) < 0.5
        np.testing.assert_allclose(np.median(msg.depth), FX * BASELINE / DISPARITY, rtol=0.03)
        np.testing.assert_allclose(msg.disparity, msg.x_left - msg.x_right, atol=1e-5)
    for (_, track, _), (_, left, _) in zip(tracks, out["/stereo/keypoints"]):
        assert np.array_equal(track.x, left.x)
        assert len(track.x_right) == len(track.y_right) == len(track.depth) == len(track.x)
        linked = np.isfinite(track.depth)
        assert linked.sum() >= 5 and np.isnan(track.x_right[~linked]).all()
        disparity = track.x[linked] - track.x_right[linked]
        assert np.median(np.abs(disparity - DISPARITY)) < 1.0
        np.testing.assert_allclose(track.depth[linked], FX * BASELINE / disparity, rtol=1e-5)
    assert summary.tracks_linked > 0


def test_unrectified_stereo_bag_warns_once_and_has_no_depth(tmp_path, models):
    stereo_bag(tmp_path / "in", count=2, tx=0.0)
    logged = []
    process_stereo_bag(tmp_path / "in", tmp_path / "out", *models, log=logged.append)
    assert len(logged) == 1 and "Tx = 0" in logged[0]
    for _, msg, _ in read_outputs(tmp_path / "out")["/stereo/stereo_matches"]:
        assert "Tx = 0" in msg.warning and len(msg.x_left) and np.isnan(msg.depth).all()


def test_cli_stereo_is_deterministic(tmp_path, tiny_superpoint_dir, tiny_eloftr_dir):
    stereo_bag(tmp_path / "in", count=3)
    raws = []
    for name in ("a", "b"):
        argv = ["--superpoint-model", str(tiny_superpoint_dir), "--eloftr-model", str(tiny_eloftr_dir),
                "--device", "cpu", "--resize", "native", "--match-threshold", "0",
                "--max-keypoints", "64", "--threads", "1", "--no-progress", "--params-file", "none",
                "--stereo", "--tracks", str(tmp_path / "in"), str(tmp_path / name)]
        assert pb.main(argv) == 0
        out = read_outputs(tmp_path / name)
        raws.append({topic: [raw for _, _, raw in messages] for topic, messages in out.items()})
    assert len(raws[0]["/stereo/stereo_matches"]) == 3 and raws[0] == raws[1]


@pytest.mark.parametrize("extra, message", [(["--no-matcher"], "needs both"),
                                            (["--min-disparity", "9", "--max-disparity", "3"],
                                             "must not exceed"),
                                            (["--left-topic", "/nope"], "/nope")])
def test_cli_stereo_bad_options(tmp_path, capsys, extra, message):
    stereo_bag(tmp_path / "in", count=1)
    assert pb.main(["--stereo", *extra, str(tmp_path / "in"), str(tmp_path / "out")]) == pb.EXIT_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_prefix_is_the_stereo_namespace():
    assert output_prefix("/stereo/left/image_rect", "/stereo/right/image_rect") == "/stereo"
    assert output_prefix("/left/image_rect", "/right/image_rect") == ""
