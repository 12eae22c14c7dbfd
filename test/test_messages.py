"""kp_ros.core.messages: the one numpy <-> message-field mapping, and both message layers
built from it (rclpy: kp_ros.ros.conversions, rosbags: kp_ros.bags.messages) giving
the same serialized bytes."""
from types import SimpleNamespace

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from rclpy.serialization import serialize_message
from std_msgs.msg import Header

from kp_ros.core import messages
from kp_ros.ros import conversions
from kp_ros.bags import messages as bag_messages

STAMP_NS = 12_000_000_345


def rng_arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 2), dtype=np.float32) * 100, rng.random(n, dtype=np.float32),
            rng.standard_normal((n, 256), dtype=np.float32))


@pytest.mark.parametrize("n", [0, 3])
def test_keypoints_fields(n):
    kp, scores, desc = rng_arrays(n)
    fields = messages.keypoints_fields(4, 5, "sp", kp.astype(np.float64), scores, desc)
    assert fields["x"].dtype == np.float32 and fields["x"].flags.c_contiguous
    assert fields["descriptor_size"] == 256 and fields["descriptors"].size == n * 256
    flat = messages.keypoints_fields(4, 5, "sp", kp, scores, desc.ravel())
    assert flat["descriptor_size"] == (256 if n else 0)  # a flat block: D from N
    none = messages.keypoints_fields(4, 5, "sp", kp, scores)
    assert none["descriptor_size"] == 0 and none["descriptors"].size == 0
    back = messages.keypoints_from_msg(SimpleNamespace(**fields))  # rosbags-like: numpy fields
    assert back["keypoints"].tobytes() == kp.tobytes() and back["descriptors"].shape == (n, 256)


def test_matches_fields_inliers_empty_when_unverified():
    kp, scores, _ = rng_arrays(4)
    assert messages.matches_fields("c", 4, 5, "lo", kp, kp, scores)["inliers"].size == 0
    fields = messages.matches_fields("c", 4, 5, "lo", kp, kp + 1, scores, np.array([1, 0, 1, 1]))
    assert fields["inliers"].dtype == np.uint8
    back = messages.matches_from_msg(SimpleNamespace(**{k: (v.tobytes() if isinstance(v, np.ndarray) else v)
                                                        for k, v in fields.items()}))  # bytes: zero-copy
    assert back["inliers"].tolist() == [1, 0, 1, 1] and back["keypoints1"].tobytes() == (kp + 1).tobytes()


def tracks(n):
    kp, _, _ = rng_arrays(n)
    return SimpleNamespace(keypoints=kp,  # the fields of a kp_ros.core.tracks.FrameTracks
                           ids=np.arange(n, dtype=np.uint64) + 2**40,
                           lengths=np.arange(n, dtype=np.uint32) + 1,
                           previous_index=np.arange(n, dtype=np.int32) - 1)


@pytest.mark.parametrize("n", [0, 5])
def test_rclpy_and_rosbags_messages_serialize_alike(n):
    """Both layers fill the same fields the same way, dtypes included. With N > 0 also
    through rclpy's serializer, read back by rosbags (the bytes themselves differ in CDR
    alignment padding, which rclpy leaves uninitialized; and rosbags rejects rclpy's
    Tracks with N = 0, whose empty uint64[] rclpy aligns differently)."""
    kp, scores, desc = rng_arrays(n, seed=n)
    store = bag_messages.kp_ros_typestore()
    header = Header(stamp=Time(sec=12, nanosec=345), frame_id="cam")
    bag_header = bag_messages.header_msg(store, STAMP_NS, "cam")
    stamp0, bag_stamp0 = Time(sec=11, nanosec=1), bag_messages.time_msg(store, 11_000_000_001)
    inliers = (np.arange(n) % 2).astype(np.uint8)
    pairs = [
        (conversions.keypoints_to_msg(header, 4, 5, "sp", kp, scores, desc),
         bag_messages.keypoints_msg(store, bag_header, 4, 5, "sp", kp, scores, desc), bag_messages.KEYPOINTS_TYPE),
        (conversions.matches_to_msg(header, stamp0, "c0", 4, 5, "lo", kp, kp, scores, inliers),
         bag_messages.matches_msg(store, bag_header, bag_stamp0, "c0", 4, 5, "lo", kp, kp, scores, inliers),
         bag_messages.MATCHES_TYPE),
        (conversions.tracks_to_msg(header, 4, 5, tracks(n)),
         bag_messages.tracks_msg(store, bag_header, 4, 5, tracks(n)), bag_messages.TRACKS_TYPE),
    ]
    for rclpy_msg, bag_msg, msgtype in pairs:
        got = store.deserialize_cdr(serialize_message(rclpy_msg), msgtype) if n else rclpy_msg
        for name, _ in store.fielddefs[msgtype][1]:
            a, b = getattr(got, name), getattr(bag_msg, name)
            if isinstance(b, np.ndarray):
                a = messages.field_array(a, b.dtype)
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (msgtype, name)
            elif name not in ("header", "stamp0"):  # rclpy's and rosbags' own types
                assert a == b, (msgtype, name)
    assert conversions.tracks_from_msg(pairs[2][0])["ids"].tolist() == \
        bag_messages.tracks_from_msg(pairs[2][1])["ids"].tolist() == (np.arange(n) + 2**40).tolist()
