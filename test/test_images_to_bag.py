"""kp_ros.tools.images_to_bag: image folders -> Image / CompressedImage bags."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import TUM_DIR, synthetic_frame, tum_frame_paths

from kp_ros.bags import messages as bag_messages
from kp_ros.bags import reader as bag_reader
from kp_ros.tools.images_to_bag import main, stamp_from_name


def read_topic(path):
    typestore = bag_messages.kp_ros_typestore()
    reader = bag_reader.open_bag(path)
    topic, msgtype, connections = bag_reader.image_connections(reader, None)
    out = [(log_ns, typestore.deserialize_cdr(data, msgtype))
           for _, log_ns, data in bag_reader.read_messages(reader, connections)]
    reader.close()
    return topic, msgtype, out


def write_folder(folder, names, size=(48, 64)):
    folder.mkdir()
    frames = []
    for i, name in enumerate(names):
        frame = synthetic_frame(*size, seed=i)
        cv2.imwrite(str(folder / name), frame[:, :, ::-1])
        frames.append(frame)
    return frames


def test_stamp_from_name_is_exact():
    assert stamp_from_name("1341847980.722988.png") == 1_341_847_980_722_988_000
    assert stamp_from_name("/x/12.000000001.jpg") == 12_000_000_001
    assert stamp_from_name("17.png") == 17_000_000_000
    assert stamp_from_name("frame_0001.png") is None


def test_tum_folder(tmp_path, capsys):
    paths = tum_frame_paths()
    if not paths:
        pytest.skip(f"shared TUM frames not found at {TUM_DIR}")
    assert main([str(TUM_DIR), str(tmp_path / "tum"), "--limit", "3"]) == 0
    assert "wrote 3 frames" in capsys.readouterr().out
    topic, msgtype, messages = read_topic(tmp_path / "tum")
    assert (topic, msgtype) == ("/camera/image_raw", bag_messages.IMAGE_TYPE)
    for path, (log_ns, msg) in zip(paths, messages):
        assert log_ns == bag_messages.stamp_to_ns(msg.header.stamp) == stamp_from_name(path)
        assert (msg.encoding, msg.height, msg.width, msg.step, msg.header.frame_id) == \
            ("rgb8", 480, 640, 1920, "camera")
        expected = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        assert np.array_equal(bag_reader.decode_image_msg(msg, msgtype), expected)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8"])
def test_rate_and_encodings(tmp_path, encoding):
    frames = write_folder(tmp_path / "imgs", ["b.png", "a.png", "c.jpg"])
    out = tmp_path / "bag"
    assert main([str(tmp_path / "imgs"), str(out), "--rate", "4", "--start", "10", "--encoding", encoding,
                 "--topic", "/cam/image", "--frame-id", "optical", "--storage", "mcap"]) == 0
    topic, _, messages = read_topic(out)
    assert topic == "/cam/image" and bag_reader.detect_storage(out) == "mcap"
    assert [log for log, _ in messages] == [10_000_000_000, 10_250_000_000, 10_500_000_000]
    first = messages[0][1]
    assert first.encoding == encoding and first.header.frame_id == "optical"
    decoded = bag_reader.decode_image_msg(first, bag_messages.IMAGE_TYPE)  # a.png: name order
    expected = frames[1] if encoding != "mono8" else cv2.cvtColor(frames[1], cv2.COLOR_RGB2GRAY)
    assert np.array_equal(decoded, expected)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_compressed(tmp_path, fmt):
    frames = write_folder(tmp_path / "imgs", ["1.5.png", "1.png"])
    assert main([str(tmp_path / "imgs"), str(tmp_path / "bag"), "--compressed", fmt,
                 "--topic", "/cam/image/compressed"]) == 0
    _, msgtype, messages = read_topic(tmp_path / "bag")
    assert msgtype == bag_messages.COMPRESSED_TYPE
    assert [log for log, _ in messages] == [1_000_000_000, 1_500_000_000]  # sorted by stamp
    assert messages[0][1].format == fmt
    decoded = bag_reader.decode_image_msg(messages[0][1], msgtype)
    error = np.abs(decoded.astype(int) - frames[1]).mean()
    assert error == 0 if fmt == "png" else error < 8


def test_errors(tmp_path, capsys):
    write_folder(tmp_path / "imgs", ["frame_1.png"])
    assert main([str(tmp_path / "imgs"), str(tmp_path / "bag")]) == 1
    assert "--rate" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), str(tmp_path / "bag")]) == 1
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "bag")]) == 1
    assert "no .png" in capsys.readouterr().err
    assert main([str(tmp_path / "imgs"), str(tmp_path / "bag"), "--rate", "1"]) == 0
    assert main([str(tmp_path / "imgs"), str(tmp_path / "bag"), "--rate", "1"]) == 1
    assert "exists already" in capsys.readouterr().err
    assert main([str(tmp_path / "imgs"), str(tmp_path / "bag"), "--rate", "1", "--overwrite"]) == 0


@pytest.mark.parametrize("output", ["imgs", "./imgs/", "imgs/bag", "."])
def test_output_that_is_or_overlaps_the_input_folder_is_refused(tmp_path, capsys, monkeypatch, output):
    """Issue 13: the output (replaced with --overwrite) must never be or contain the images."""
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "imgs", ["1.0.png", "2.0.png"])
    before = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert main(["imgs", output, "--overwrite"]) == 1
    assert "input" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == before


def test_frame_index_names_are_not_taken_as_times(tmp_path, capsys):
    """Issue 13: '250.png, 254.png, ...' were stamped 250 s, 254 s, ... (4 s apart, so
    process_bag reset the matcher on every frame): without --rate that is now an error
    saying why; with --rate they are stamped from 0 (or --start) in index order."""
    frames = write_folder(tmp_path / "imgs", ["250.png", "254.png", "258.png", "1000.png"])
    assert main([str(tmp_path / "imgs"), str(tmp_path / "bag")]) == 1
    err = capsys.readouterr().err
    assert "frame indices" in err and "--rate" in err and "250.png" in err
    assert not (tmp_path / "bag").exists()
    assert main([str(tmp_path / "imgs"), str(tmp_path / "bag"), "--rate", "10"]) == 0
    out = capsys.readouterr().out
    assert "frame indices" in out and "10 Hz" in out
    _, _, messages = read_topic(tmp_path / "bag")
    assert [log_ns for log_ns, _ in messages] == [0, 100_000_000, 200_000_000, 300_000_000]
    # numeric order, not string order: 1000.png is last
    for frame, (_, msg) in zip(frames, messages):
        assert np.array_equal(bag_reader.decode_image_msg(msg, bag_messages.IMAGE_TYPE), frame)


def test_times_in_seconds_are_still_read_from_names(tmp_path):
    write_folder(tmp_path / "imgs", ["1341847980.722988.png", "1341847980.754743.png", "17.5.png"])
    assert main([str(tmp_path / "imgs"), str(tmp_path / "bag")]) == 0
    _, _, messages = read_topic(tmp_path / "bag")
    assert [log_ns for log_ns, _ in messages] == [17_500_000_000, 1_341_847_980_722_988_000,
                                                  1_341_847_980_754_743_000]
