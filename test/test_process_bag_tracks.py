"""process_bag --tracks: kp_ros/Tracks for every processed frame, deterministic, consistent
with the Keypoints and Matches written beside them, new tracks after a stream reset; and
geometric_verification essential with the bag's camera_info."""
from __future__ import annotations

import numpy as np
import pytest

from kp_ros.bags import messages as bag_messages
from kp_ros.bags import writer as bag_writer
from kp_ros.core.tracks import TrackParams
from kp_ros.offline import process_bag_cli as pb
from test_process_bag import STEP, T0, frames, image_bag, models, one_thread, read_outputs  # noqa: F401


def test_tracks_for_every_frame_consistent_with_keypoints(tmp_path, models):  # noqa: F811
    stamps = [T0 + i * STEP for i in range(4)] + [T0 + 10 * STEP * 30]  # last: a gap, the stream resets
    image_bag(tmp_path / "in", frames(5), stamps=stamps)
    summary = pb.process_bag(tmp_path / "in", tmp_path / "out", *models, max_frame_gap=1.0,
                             tracks=TrackParams(association_radius=8.0, inliers_only=False))
    out = read_outputs(tmp_path / "out")
    keypoints, matches, tracks = out["/cam/keypoints"], out["/cam/matches"], out["/cam/tracks"]
    assert len(tracks) == len(keypoints) == 5 and summary.tracks_msgs == 5
    assert "tracks" in summary.text()
    all_ids = []
    for k, ((_, kp, _), (_, tr, _)) in enumerate(zip(keypoints, tracks)):
        assert tr.header.stamp == kp.header.stamp and (tr.height, tr.width) == (kp.height, kp.width)
        assert np.array_equal(tr.x, kp.x) and np.array_equal(tr.y, kp.y)
        assert len(tr.ids) == len(tr.lengths) == len(tr.previous_index) == len(kp.x)
        new = tr.previous_index < 0
        assert (tr.lengths[new] == 1).all() and (tr.lengths[~new] >= 2).all()
        if k:
            previous = tracks[k - 1][1]
            linked = np.flatnonzero(~new)
            assert np.array_equal(tr.ids[linked], previous.ids[tr.previous_index[linked]])
            assert np.array_equal(tr.lengths[linked], previous.lengths[tr.previous_index[linked]] + 1)
        all_ids.append(tr.ids[new])
    all_ids = np.concatenate(all_ids)
    assert len(np.unique(all_ids)) == len(all_ids)  # every new track has an id never used before
    assert summary.tracks_linked > 0  # random weights at threshold 0 and an 8 px radius link some
    assert (tracks[0][1].previous_index == -1).all() and (tracks[4][1].previous_index == -1).all()
    assert len(matches) == 3  # frames 1-3; frame 4 restarted the stream


def test_cli_tracks_are_deterministic(tmp_path, tiny_superpoint_dir, tiny_eloftr_dir):
    image_bag(tmp_path / "in", frames(3))
    raws = []
    for name in ("a", "b"):
        argv = ["--superpoint-model", str(tiny_superpoint_dir), "--eloftr-model", str(tiny_eloftr_dir),
                "--device", "cpu", "--resize", "native", "--match-threshold", "0", "--max-keypoints", "64",
                "--threads", "1", "--no-progress", "--params-file", "none", "--tracks",
                "--association-radius", "8", str(tmp_path / "in"), str(tmp_path / name)]
        assert pb.main(argv) == 0
        raws.append([raw for _, _, raw in read_outputs(tmp_path / name)["/cam/tracks"]])
    assert len(raws[0]) == 3 and raws[0] == raws[1]


@pytest.mark.parametrize("extra, message", [(["--no-matcher"], "needs both"),
                                            (["--association-radius", "0"], "association_radius")])
def test_cli_tracks_bad_options(tmp_path, capsys, extra, message):
    image_bag(tmp_path / "in", frames(2))
    assert pb.main(["--tracks", *extra, str(tmp_path / "in"), str(tmp_path / "out")]) == pb.EXIT_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tracks_type_is_in_the_typestore():
    store = bag_messages.kp_ros_typestore()
    assert bag_messages.TRACKS_TYPE in store.fielddefs


# --- essential verification with the bag's camera_info -------------------------------

def add_camera_info(path, k=(120.0, 0, 80, 0, 120.0, 64, 0, 0, 1), topic="/cam/camera_info"):
    """A copy of the image bag at ``path`` with one CameraInfo on ``topic``."""
    from test_process_bag import TYPESTORE
    types = TYPESTORE.types
    info = types["sensor_msgs/msg/CameraInfo"](
        header=bag_messages.header_msg(TYPESTORE, T0, "cam"), height=128, width=160,
        distortion_model="plumb_bob", d=np.array([-0.1, 0.01, 0, 0, 0], np.float64),
        k=np.array(k, np.float64), r=np.eye(3).ravel(), p=np.zeros(12),
        binning_x=0, binning_y=0,
        roi=types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                      do_rectify=False))
    original = read_outputs(path)
    out = path.with_name(path.name + "_info")
    with bag_writer.AtomicBagWriter(out, "sqlite3") as writer:
        conn = writer.add_connection(topic, "sensor_msgs/msg/CameraInfo", TYPESTORE)
        writer.write(conn, T0, TYPESTORE.serialize_cdr(info, "sensor_msgs/msg/CameraInfo"))
        image = writer.add_connection("/cam/image_raw", bag_messages.IMAGE_TYPE, TYPESTORE)
        for log_ns, _, raw in original["/cam/image_raw"]:
            writer.write(image, log_ns, raw)
    return out


def test_essential_uses_the_bags_camera_info(tmp_path, models):  # noqa: F811
    detector, matcher = models
    with_info = add_camera_info(image_bag(tmp_path / "in", frames(3)))
    logged = []
    try:
        matcher.set_params(geometric_verification="essential")
        pb.process_bag(with_info, tmp_path / "out", detector, matcher, log=logged.append)
        assert matcher.camera is not None and matcher.camera.focal == 120.0
        assert not logged
        matches = read_outputs(tmp_path / "out")["/cam/matches"]
        assert len(matches) == 2 and all(len(m.inliers) == len(m.x0) for _, m, _ in matches)
        pb.process_bag(tmp_path / "in", tmp_path / "out2", detector, matcher, log=logged.append)
        assert matcher.camera is None and "no sensor_msgs/CameraInfo on /cam/camera_info" in logged[0]
    finally:
        matcher.set_params(geometric_verification="none")
        matcher.camera = None


def test_essential_with_unusable_camera_info_says_why(tmp_path, models):  # noqa: F811
    detector, matcher = models
    with_info = add_camera_info(image_bag(tmp_path / "in", frames(2)), k=(0.0,) * 9)
    logged = []
    try:
        matcher.set_params(geometric_verification="essential")
        pb.process_bag(with_info, tmp_path / "out", detector, matcher, log=logged.append)
        assert matcher.camera is None and "intrinsics" in logged[0]
    finally:
        matcher.set_params(geometric_verification="none")
