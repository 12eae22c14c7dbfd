"""kp_ros.bags.messages / bag_reader / bag_writer: types, decoding, frame order, atomic
writing, corrupt input."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from kp_ros.core import package_files
from kp_ros.bags import messages as bag_messages
from kp_ros.bags import reader as bag_reader
from kp_ros.bags.messages import COMPRESSED_TYPE, IMAGE_TYPE, KEYPOINTS_TYPE, MATCHES_TYPE
from kp_ros.bags.reader import BagError
from kp_ros.bags.writer import AtomicBagWriter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def typestore():
    return bag_messages.kp_ros_typestore()


def write_bag(path, typestore, frames, storage="sqlite3", topic="/cam/image_raw", extra=()):
    """frames: [(log_ns, stamp_ns, rgb image)]; extra: [(topic, msgtype, log_ns, message)]."""
    with AtomicBagWriter(path, storage) as writer:
        connection = writer.add_connection(topic, IMAGE_TYPE, typestore)
        for log_ns, stamp_ns, image in frames:
            msg = bag_messages.image_msg(typestore, image, "rgb8", bag_messages.header_msg(typestore, stamp_ns, "cam"))
            writer.write(connection, log_ns, typestore.serialize_cdr(msg, IMAGE_TYPE))
        for extra_topic, msgtype, log_ns, msg in extra:
            writer.write(writer.add_connection(extra_topic, msgtype, typestore), log_ns,
                         typestore.serialize_cdr(msg, msgtype))
    return path


# --- types ---------------------------------------------------------------------------

def test_msg_definitions_hash_like_rosidl(typestore):
    """The RIHS01 hashes written into bags equal the ones rosidl generated for the package,
    so ROS tools accept the bags' kp_ros types as theirs."""
    installed = sorted(package_files.msg_dir().glob("*.json"))
    if not installed:
        pytest.skip("kp_ros is not installed (no rosidl-generated share/kp_ros/msg/*.json)")
    for path in installed:
        expected = json.loads(path.read_text())["type_hashes"][0]
        assert typestore.hash_rihs01(expected["type_name"]) == expected["hash_string"]


def test_msg_dir_falls_back_to_source_tree(monkeypatch):
    monkeypatch.setenv("AMENT_PREFIX_PATH", "/nonexistent")
    assert package_files.msg_dir() == REPO / "msg"


def test_keypoints_and_matches_round_trip(tmp_path, typestore):
    rng = np.random.default_rng(0)
    header = bag_messages.header_msg(typestore, 1_500_000_000_123, "cam")
    kp = rng.random((7, 2), dtype=np.float32) * 100
    desc = rng.random((7, 256), dtype=np.float32)
    keypoints = bag_messages.keypoints_msg(typestore, header, 120, 160, "sp", kp, kp[:, 0], desc)
    empty = bag_messages.keypoints_msg(typestore, header, 120, 160, "sp", np.zeros((0, 2)), np.zeros(0),
                                       np.zeros((0, 256)))
    stamp0 = bag_messages.time_msg(typestore, 1_400_000_000_000)
    matches = bag_messages.matches_msg(typestore, header, stamp0, "cam0", 120, 160, "lo", kp, kp + 1,
                                       kp[:, 1], np.arange(7) % 2)
    for storage in ("sqlite3", "mcap"):
        path = tmp_path / storage
        with AtomicBagWriter(path, storage) as writer:
            for topic, msgtype, msg in (("/k", KEYPOINTS_TYPE, keypoints), ("/e", KEYPOINTS_TYPE, empty),
                                        ("/m", MATCHES_TYPE, matches)):
                writer.write(writer.add_connection(topic, msgtype, typestore), 5,
                             typestore.serialize_cdr(msg, msgtype))
        reader = bag_reader.open_bag(path)
        got = {c.topic: typestore.deserialize_cdr(d, c.msgtype) for c, _, d in reader.messages()}
        assert {c.msgdef.format.name for c in reader.connections} == {"MSG"}  # definitions embedded
        reader.close()
        k = bag_messages.keypoints_from_msg(got["/k"])
        assert np.array_equal(k["keypoints"], kp) and np.array_equal(k["descriptors"], desc)
        assert got["/k"].descriptor_size == 256 and bag_messages.stamp_to_ns(
            got["/k"].header.stamp) == 1_500_000_000_123
        assert bag_messages.keypoints_from_msg(got["/e"])["descriptors"].shape == (0, 256)
        m = bag_messages.matches_from_msg(got["/m"])
        assert np.array_equal(m["keypoints1"], kp + 1) and m["inliers"].tolist() == [0, 1, 0, 1, 0, 1, 0]
        assert got["/m"].frame_id0 == "cam0" and bag_messages.stamp_to_ns(got["/m"].stamp0) == 1_400_000_000_000


@pytest.mark.parametrize("little_endian", [True, False])
def test_header_stamp_from_cdr(typestore, little_endian):
    msg = bag_messages.image_msg(typestore, np.zeros((2, 3), np.uint8), "mono8",
                                 bag_messages.header_msg(typestore, -1_000_000_001, "cam"))  # before 1970 too
    raw = typestore.serialize_cdr(msg, IMAGE_TYPE, little_endian=little_endian)
    assert bag_reader.header_stamp_from_cdr(raw) == -1_000_000_001
    with pytest.raises(BagError):
        bag_reader.header_stamp_from_cdr(raw[:8])


# --- decoding ------------------------------------------------------------------------

RGB = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)


@pytest.mark.parametrize("encoding, pixels, expected", [
    ("rgb8", RGB, RGB),
    ("bgr8", RGB[:, :, ::-1], RGB),
    ("8UC3", RGB[:, :, ::-1], RGB),
    ("rgba8", np.dstack([RGB, np.full((4, 5), 9, np.uint8)]), RGB),
    ("bgra8", np.dstack([RGB[:, :, ::-1], np.full((4, 5), 9, np.uint8)]), RGB),
    ("mono8", RGB[:, :, 0], RGB[:, :, 0]),
    ("8UC1", RGB[:, :, 0], RGB[:, :, 0]),
    ("mono16", RGB[:, :, 0].astype(np.uint16) * 256 + 77, RGB[:, :, 0]),
])
@pytest.mark.parametrize("padding", [0, 4])
def test_decode_image_fields(encoding, pixels, expected, padding):
    rows = pixels.reshape(4, -1).view(np.uint8)
    padded = np.pad(rows, ((0, 0), (0, padding)), constant_values=255)
    image = bag_reader.decode_image_fields(4, 5, encoding, padded.shape[1], padded.tobytes())
    assert image.dtype == np.uint8 and np.array_equal(image, expected)


@pytest.mark.parametrize("height, width, encoding, step, size, why", [
    (4, 5, "rgb8", 15, 59, "data has 59 bytes"),
    (0, 5, "rgb8", 15, 0, "empty image"),
    (4, 5, "rgb8", 14, 60, "step 14"),
    (4, 5, "yuv422_weird", 15, 60, "unsupported encoding"),
])
def test_decode_image_fields_rejects_malformed(height, width, encoding, step, size, why):
    with pytest.raises(ValueError, match=why):
        bag_reader.decode_image_fields(height, width, encoding, step, bytes(size))


def test_decode_compressed():
    ok, png = cv2.imencode(".png", RGB[:, :, ::-1])
    assert np.array_equal(bag_reader.decode_compressed(png.tobytes()), RGB)
    ok, png = cv2.imencode(".png", RGB[:, :, 0])
    assert bag_reader.decode_compressed(png.tobytes()).shape == (4, 5)
    for garbage in (b"", b"not an image at all"):
        with pytest.raises(ValueError):
            bag_reader.decode_compressed(garbage)


def test_decode_image_msg_both_types(typestore):
    header = bag_messages.header_msg(typestore, 0, "cam")
    raw = bag_messages.image_msg(typestore, RGB, "rgb8", header)
    assert np.array_equal(bag_reader.decode_image_msg(raw, IMAGE_TYPE), RGB)
    ok, png = cv2.imencode(".png", RGB[:, :, ::-1])
    compressed = bag_messages.compressed_image_msg(typestore, png.tobytes(), "png", header)
    assert np.array_equal(bag_reader.decode_image_msg(compressed, COMPRESSED_TYPE), RGB)
    assert bag_reader.image_encoding(compressed, COMPRESSED_TYPE) == "png"
    with pytest.raises(ValueError):
        bag_messages.image_msg(typestore, RGB, "mono8", header)


# --- reading -------------------------------------------------------------------------

@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_iter_frames_orders(tmp_path, typestore, storage):
    """Receive order is the bag's; stamp order sorts by header stamp, ties by receive order."""
    stamps = [30, 10, 20, 50, 40, 40]
    frames = [(100 + i, s, np.full((2, 2, 3), i, np.uint8)) for i, s in enumerate(stamps)]
    path = write_bag(tmp_path / "bag", typestore, frames, storage)
    assert bag_reader.detect_storage(path) == storage
    reader = bag_reader.open_bag(path)
    topic, msgtype, connections = bag_reader.image_connections(reader, None)
    assert (topic, msgtype) == ("/cam/image_raw", IMAGE_TYPE)
    received = list(bag_reader.iter_frames(reader, connections, "receive"))
    by_stamp = list(bag_reader.iter_frames(reader, connections, "stamp"))
    reader.close()
    assert [f.stamp_ns for f in received] == stamps and [f.index for f in received] == list(range(6))
    assert [f.stamp_ns for f in by_stamp] == sorted(stamps)
    assert [f.index for f in by_stamp] == [1, 2, 0, 4, 5, 3]
    assert [f.log_ns for f in by_stamp] == [101, 102, 100, 104, 105, 103]
    first = typestore.deserialize_cdr(by_stamp[0].data, IMAGE_TYPE)
    assert first.data[0] == 1


def test_image_connections_errors(tmp_path, typestore):
    header = bag_messages.header_msg(typestore, 0, "cam")
    kp = bag_messages.keypoints_msg(typestore, header, 1, 1, "sp", np.zeros((0, 2)), np.zeros(0))
    path = write_bag(tmp_path / "bag", typestore, [(1, 1, RGB)],
                     extra=[("/kp", KEYPOINTS_TYPE, 1, kp),
                            ("/other/image", IMAGE_TYPE, 2, bag_messages.image_msg(typestore, RGB, "rgb8", header))])
    reader = bag_reader.open_bag(path)
    with pytest.raises(BagError, match=r"'/nope' is not in the bag.*/cam/image_raw.*/other/image"):
        bag_reader.image_connections(reader, "/nope")
    with pytest.raises(BagError, match=r"'/kp' has type kp_ros/msg/Keypoints, not"):
        bag_reader.image_connections(reader, "/kp")
    with pytest.raises(BagError, match="choose an image topic with --topic"):
        bag_reader.image_connections(reader, None)
    reader.close()


def test_open_bag_missing_and_not_a_bag(tmp_path):
    with pytest.raises(BagError, match="does not exist"):
        bag_reader.open_bag(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BagError, match="cannot open bag"):
        bag_reader.open_bag(tmp_path / "empty")
    with pytest.raises(BagError, match="not a rosbag2 bag"):
        bag_reader.detect_storage(tmp_path / "empty")


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_bag_is_a_clear_error(tmp_path, typestore, storage, keep):
    frames = [(i, i, np.full((48, 64, 3), i, np.uint8)) for i in range(6)]
    path = write_bag(tmp_path / "bag", typestore, frames, storage)
    data_file = next(p for p in path.iterdir() if p.suffix in (".db3", ".mcap"))
    with open(data_file, "r+b") as handle:
        handle.truncate(int(data_file.stat().st_size * keep))
    with pytest.raises(BagError, match="truncated or corrupt"):
        reader = bag_reader.open_bag(path)
        _, _, connections = bag_reader.image_connections(reader, None)
        list(bag_reader.iter_frames(reader, connections))


# --- writing -------------------------------------------------------------------------

def test_atomic_writer_leaves_nothing_on_error(tmp_path, typestore):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with AtomicBagWriter(target, "mcap") as writer:
            writer.add_connection("/x", IMAGE_TYPE, typestore)
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_writer_refuses_or_replaces_existing(tmp_path, typestore):
    target = write_bag(tmp_path / "out", typestore, [(1, 1, RGB)])
    with pytest.raises(BagError, match="exists already"):
        AtomicBagWriter(target)
    write_bag_overwrite = AtomicBagWriter(target, "mcap", overwrite=True)
    with write_bag_overwrite as writer:
        writer.add_connection("/y", IMAGE_TYPE, typestore)
    assert sorted(p.name for p in target.iterdir()) == ["metadata.yaml", "out.mcap"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    shutil.rmtree(target)
