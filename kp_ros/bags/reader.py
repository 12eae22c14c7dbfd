"""Reading rosbag2 bags for the bag tools, with ``rosbags`` (pure Python, no ROS).

- ``open_bag`` / ``image_connections`` / ``iter_frames``: the frames of one image topic,
  in header-stamp or receive order, with corrupt input reported as ``BagError``.
- ``decode_image_fields`` / ``decode_compressed`` / ``decode_image_msg``: message fields
  to the uint8 mono or RGB arrays the models take (through ``image_codec``, like the nodes).
"""
from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Reader

from kp_ros.core.image_codec import ImageDecodeError, image_from_buffer, to_model_input
from kp_ros.core.image_codec import decode_compressed as _decode_compressed
from kp_ros.bags.messages import COMPRESSED_TYPE, IMAGE_TYPE, IMAGE_TYPES


class BagError(RuntimeError):
    """A bag that cannot be used as asked (missing, corrupt, no such topic); says why."""


def header_stamp_from_cdr(raw) -> int:
    """The header stamp (ns) of a serialized message whose first field is a std_msgs/Header,
    read from the CDR bytes without deserializing the rest (the image data)."""
    if len(raw) < 12:
        raise BagError(f"message of {len(raw)} bytes is too short to hold a header")
    # Encapsulation: byte 1 is 1 for little-endian CDR, 0 for big-endian.
    sec, nanosec = struct.unpack_from("<iI" if raw[1] & 1 else ">iI", raw, 4)
    return sec * 1_000_000_000 + nanosec


def detect_storage(path: str | Path) -> str:
    """'sqlite3' or 'mcap' for a bag directory (from its metadata) or a .db3/.mcap file."""
    path = Path(path)
    if path.is_dir():
        files = [p.suffix for p in path.iterdir()]
        if ".mcap" in files:
            return "mcap"
        if ".db3" in files:
            return "sqlite3"
    elif path.suffix in (".mcap", ".db3"):
        return "mcap" if path.suffix == ".mcap" else "sqlite3"
    raise BagError(f"{path}: not a rosbag2 bag (no .db3 or .mcap file)")


def open_bag(path: str | Path) -> Reader:
    """An open rosbags Reader for a rosbag2 directory or a bare .db3/.mcap file."""
    path = Path(path)
    if not path.exists():
        raise BagError(f"input bag {str(path)!r} does not exist")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as err:  # rosbags raises ReaderError, apsw errors, OSError, ...
        raise BagError(f"cannot open bag {str(path)!r} (truncated or corrupt?): "
                       f"{type(err).__name__}: {err}") from err
    return reader


def describe_image_topics(reader: Reader) -> str:
    topics = {c.topic: c.msgtype for c in reader.connections if c.msgtype in IMAGE_TYPES}
    if not topics:
        return "the bag has no sensor_msgs/msg/Image or CompressedImage topics"
    return "image topics in the bag: " + ", ".join(f"{t} ({m})" for t, m in sorted(topics.items()))


def image_connections(reader: Reader, topic: str | None) -> tuple[str, str, list]:
    """(topic, msgtype, connections) of one image topic; ``topic=None`` takes the only
    one. BagError listing the image topics if the topic is absent, ambiguous or not an image."""
    if topic is None:
        topics = sorted({c.topic for c in reader.connections if c.msgtype in IMAGE_TYPES})
        if len(topics) != 1:
            raise BagError(("choose an image topic with --topic: " if topics else "")
                           + describe_image_topics(reader))
        topic = topics[0]
    connections = [c for c in reader.connections if c.topic == topic]
    if not connections:
        raise BagError(f"topic {topic!r} is not in the bag; {describe_image_topics(reader)}")
    msgtypes = sorted({c.msgtype for c in connections})
    if len(msgtypes) != 1 or msgtypes[0] not in IMAGE_TYPES:
        raise BagError(f"topic {topic!r} has type {', '.join(msgtypes)}, not "
                       f"{IMAGE_TYPE} or {COMPRESSED_TYPE}; {describe_image_topics(reader)}")
    return topic, msgtypes[0], connections


@dataclass(frozen=True)
class RawFrame:
    """One serialized image message: ``index`` is its position in receive order."""
    index: int
    log_ns: int     # the bag's receive timestamp
    stamp_ns: int   # header.stamp
    connection: object
    data: bytes


def read_messages(reader: Reader, connections: Sequence) -> Iterator[tuple]:
    """``reader.messages`` (connection, log_ns, raw bytes), with a truncated or corrupt
    storage file turned into a BagError."""
    path = getattr(reader, "path", "?")
    messages = reader.messages(connections=connections)
    while True:
        try:
            item = next(messages)
        except StopIteration:
            return
        except Exception as err:  # apsw.CorruptError, ReaderError, struct.error, ...
            raise BagError(f"cannot read bag {str(path)!r}: truncated or corrupt "
                           f"({type(err).__name__}: {err})") from err
        yield item


def iter_frames(reader: Reader, connections: Sequence, order: str = "stamp") -> Iterator[RawFrame]:
    """The topic's messages in header-stamp order (``'stamp'``, ties by receive order) or
    in receive order (``'receive'``, as a live subscriber sees the bag played back).

    Stamp order costs a first pass that reads only the stamps; the second pass then
    holds back just the messages that arrived early, so memory grows with the disorder
    of the bag, not its length (an already ordered bag buffers nothing).
    """
    path = getattr(reader, "path", "?")
    if order == "receive":
        for index, (connection, log_ns, data) in enumerate(read_messages(reader, connections)):
            yield RawFrame(index, log_ns, header_stamp_from_cdr(data), connection, data)
        return
    if order != "stamp":
        raise ValueError(f"unknown order {order!r}: use 'stamp' or 'receive'")
    keys = [(header_stamp_from_cdr(data), log_ns, index)
            for index, (_, log_ns, data) in enumerate(read_messages(reader, connections))]
    rank_of = {key[2]: rank for rank, key in enumerate(sorted(keys))}
    held: dict[int, RawFrame] = {}
    next_rank = 0
    for index, (connection, log_ns, data) in enumerate(read_messages(reader, connections)):
        if index >= len(keys):
            raise BagError(f"bag {str(path)!r} changed while being read")
        held[rank_of[index]] = RawFrame(index, log_ns, keys[index][0], connection, data)
        while next_rank in held:
            yield held.pop(next_rank)
            next_rank += 1
    if held or next_rank != len(keys):
        raise BagError(f"bag {str(path)!r} changed while being read")


# --- decoding ----------------------------------------------------------------------

def decode_image_fields(height: int, width: int, encoding: str, step: int, data,
                        is_bigendian: bool = False) -> np.ndarray:
    """uint8 mono (HxW) or RGB (HxWx3) from sensor_msgs/Image fields.

    mono16 keeps the high byte; bgr/rgba/bgra are reordered/stripped to RGB; 8UC1/8UC3
    count as mono8/bgr8. ValueError (ImageDecodeError) for unknown encodings, zero sizes,
    ``step`` < one row, or ``data`` shorter than ``step * height``.
    """
    return to_model_input(image_from_buffer(data, int(height), int(width), encoding, int(step),
                                            bool(is_bigendian)), encoding)


def decode_compressed(data) -> np.ndarray:
    """uint8 mono or RGB from CompressedImage.data (JPEG, PNG, ...); ValueError if undecodable."""
    return _decode_compressed(data)


def decode_image_msg(msg, msgtype: str) -> np.ndarray:
    """The model input of a deserialized Image or CompressedImage."""
    if msgtype == COMPRESSED_TYPE:
        return decode_compressed(msg.data)
    return decode_image_fields(msg.height, msg.width, msg.encoding, msg.step, msg.data,
                               msg.is_bigendian)


def image_encoding(msg, msgtype: str) -> str:
    """What the stream continuity check compares: encoding, or format when compressed
    (as eloftr_node does)."""
    return msg.format if msgtype == COMPRESSED_TYPE else msg.encoding


__all__ = [
    "BagError", "ImageDecodeError", "RawFrame", "decode_compressed", "decode_image_fields",
    "decode_image_msg", "describe_image_topics", "detect_storage", "header_stamp_from_cdr",
    "image_connections", "image_encoding", "iter_frames", "open_bag", "read_messages",
]
