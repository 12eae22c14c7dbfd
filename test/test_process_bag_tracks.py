"""process_bag --tracks: kp_ros/Tracks for every processed frame, deterministic, consistent
with the Keypoints and Matches written beside them, new tracks after a stream reset."""
from __future__ import annotations

import numpy as np
import pytest

from kp_ros.core import bag_io
from kp_ros.core.tracks import TrackParams
from kp_ros.tools import process_bag as pb
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
    store = bag_io.kp_ros_typestore()
    assert bag_io.TRACKS_TYPE in store.fielddefs
