"""rosbag2 reading and writing for the bag tools, with ``rosbags`` (pure Python, no ROS).

- ``kp_ros_typestore``: the ROS 2 types plus kp_ros/msg/Keypoints and Matches, parsed
  from the package's own .msg files, so the definitions written into a bag are the ones
  a ROS install generates (same RIHS01 hashes) and ``ros2 bag info/play`` can use them.
- ``open_bag`` / ``image_connections`` / ``iter_frames``: the frames of one image topic,
  in header-stamp or receive order, with corrupt input reported as ``BagError``.
- ``decode_image_fields`` / ``decode_compressed`` / ``decode_image_msg``: message fields
  to the uint8 mono or RGB arrays the models take (through ``image_codec``, like the nodes).
- ``keypoints_msg`` / ``matches_msg`` / ``image_msg`` / ``compressed_image_msg``: numpy in,
  rosbags message out (arrays assigned whole, never element by element).
- ``AtomicBagWriter``: writes beside the target and renames on success, so a failed run
  never leaves a half-written bag under the requested name.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from kp_ros.core.image_codec import ImageDecodeError, image_from_buffer, to_model_input
from kp_ros.core.image_codec import decode_compressed as _decode_compressed

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
KEYPOINTS_TYPE = "kp_ros/msg/Keypoints"
MATCHES_TYPE = "kp_ros/msg/Matches"
TRACKS_TYPE = "kp_ros/msg/Tracks"
STORAGES = ("sqlite3", "mcap")
# The newest ROS 2 store this rosbags has (Kilted in 0.11.9); bags written with it carry
# full definitions, so older distros' readers decode them too.
_STORE = getattr(Stores, "ROS2_KILTED", Stores.LATEST)


class BagError(RuntimeError):
    """A bag that cannot be used as asked (missing, corrupt, no such topic); says why."""


# --- types -------------------------------------------------------------------------

def package_file(relative: str) -> Path:
    """A file of the kp_ros package (e.g. msg/Keypoints.msg, config/matcher.yaml): the
    installed share/kp_ros copy when the package is installed (ament index), else the
    copy a ``pip install .`` puts in kp_ros/share/ (setup.py), else the source tree's."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            installed = Path(get_package_share_directory("kp_ros")) / relative
            if installed.is_file():
                return installed
        except (PackageNotFoundError, KeyError, ValueError, OSError):  # OSError: no AMENT_PREFIX_PATH
            pass
    except ImportError:
        pass
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "share" / relative, package.parent / relative):
        if candidate.is_file():
            return candidate
    raise BagError(f"cannot find kp_ros's {relative}: neither in the ament index "
                   f"(AMENT_PREFIX_PATH) nor next to the package at {package}")


def msg_dir() -> Path:
    """The directory holding Keypoints.msg and Matches.msg."""
    return package_file("msg/Keypoints.msg").parent


@lru_cache(maxsize=1)
def _kp_ros_types() -> dict:
    types = {}
    for name in ("Keypoints", "Matches", "Tracks"):
        text = (msg_dir() / f"{name}.msg").read_text()
        types.update(get_types_from_msg(text, f"kp_ros/msg/{name}"))
    return types


def kp_ros_typestore():
    """A fresh rosbags Typestore: the ROS 2 standard types plus kp_ros/msg/*."""
    typestore = get_typestore(_STORE)
    typestore.register(_kp_ros_types())
    return typestore


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time (anything with sec, nanosec) -> int nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def time_msg(typestore, stamp_ns: int):
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return typestore.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)


def header_msg(typestore, stamp_ns: int, frame_id: str):
    return typestore.types["std_msgs/msg/Header"](stamp=time_msg(typestore, stamp_ns),
                                                  frame_id=frame_id)


def header_stamp_from_cdr(raw) -> int:
    """The header stamp (ns) of a serialized message whose first field is a std_msgs/Header,
    read from the CDR bytes without deserializing the rest (the image data)."""
    if len(raw) < 12:
        raise BagError(f"message of {len(raw)} bytes is too short to hold a header")
    # Encapsulation: byte 1 is 1 for little-endian CDR, 0 for big-endian.
    sec, nanosec = struct.unpack_from("<iI" if raw[1] & 1 else ">iI", raw, 4)
    return sec * 1_000_000_000 + nanosec


# --- reading -----------------------------------------------------------------------

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


# --- message construction ----------------------------------------------------------

def _f32(values) -> np.ndarray:
    values = values.numpy() if hasattr(values, "numpy") else values
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1))


def keypoints_msg(typestore, header, height: int, width: int, detector: str, keypoints_xy,
                  scores, descriptors=None):
    """kp_ros/msg/Keypoints from (N,2) x,y, (N,) scores, optional (N,D) descriptors
    (numpy arrays or CPU tensors)."""
    keypoints_xy = _f32(keypoints_xy).reshape(-1, 2)
    descriptor_size, flat = 0, np.zeros(0, np.float32)
    if descriptors is not None:
        descriptors = descriptors.numpy() if hasattr(descriptors, "numpy") else np.asarray(descriptors)
        descriptor_size = descriptors.shape[-1] if descriptors.ndim == 2 else (
            descriptors.size // max(len(keypoints_xy), 1))
        flat = _f32(descriptors)
    return typestore.types[KEYPOINTS_TYPE](
        header=header, height=int(height), width=int(width), detector=str(detector),
        x=np.ascontiguousarray(keypoints_xy[:, 0]), y=np.ascontiguousarray(keypoints_xy[:, 1]),
        scores=_f32(scores), descriptor_size=int(descriptor_size), descriptors=flat)


def matches_msg(typestore, header, stamp0, frame_id0: str, height: int, width: int,
                matcher: str, keypoints0, keypoints1, scores, inliers=None):
    """kp_ros/msg/Matches: ``header`` of the newer frame, ``stamp0``/``frame_id0`` of the older."""
    keypoints0 = _f32(keypoints0).reshape(-1, 2)
    keypoints1 = _f32(keypoints1).reshape(-1, 2)
    if inliers is None:
        inliers = np.zeros(0, np.uint8)
    else:
        inliers = inliers.numpy() if hasattr(inliers, "numpy") else inliers
        inliers = np.ascontiguousarray(np.asarray(inliers, dtype=np.uint8).reshape(-1))
    return typestore.types[MATCHES_TYPE](
        header=header, stamp0=stamp0, frame_id0=str(frame_id0), height=int(height),
        width=int(width), matcher=str(matcher),
        x0=np.ascontiguousarray(keypoints0[:, 0]), y0=np.ascontiguousarray(keypoints0[:, 1]),
        x1=np.ascontiguousarray(keypoints1[:, 0]), y1=np.ascontiguousarray(keypoints1[:, 1]),
        scores=_f32(scores), inliers=inliers)


def tracks_msg(typestore, header, height: int, width: int, tracks):
    """kp_ros/msg/Tracks from a kp_ros.core.tracks.FrameTracks."""
    keypoints = _f32(tracks.keypoints).reshape(-1, 2)
    return typestore.types[TRACKS_TYPE](
        header=header, height=int(height), width=int(width),
        x=np.ascontiguousarray(keypoints[:, 0]), y=np.ascontiguousarray(keypoints[:, 1]),
        ids=np.ascontiguousarray(tracks.ids, np.uint64),
        lengths=np.ascontiguousarray(tracks.lengths, np.uint32),
        previous_index=np.ascontiguousarray(tracks.previous_index, np.int32))


def keypoints_from_msg(msg) -> dict[str, np.ndarray]:
    """keypoints (N,2) x,y, scores (N,), descriptors (N,D) from a deserialized Keypoints."""
    size = int(msg.descriptor_size)
    return {"keypoints": np.stack([msg.x, msg.y], axis=1).astype(np.float32),
            "scores": np.asarray(msg.scores, np.float32),
            "descriptors": np.asarray(msg.descriptors, np.float32).reshape(len(msg.x), size)}


def matches_from_msg(msg) -> dict[str, np.ndarray]:
    return {"keypoints0": np.stack([msg.x0, msg.y0], axis=1).astype(np.float32),
            "keypoints1": np.stack([msg.x1, msg.y1], axis=1).astype(np.float32),
            "scores": np.asarray(msg.scores, np.float32),
            "inliers": np.asarray(msg.inliers, np.uint8)}


_IMAGE_CHANNELS = {"mono8": 1, "rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4}


def image_msg(typestore, image: np.ndarray, encoding: str, header):
    """sensor_msgs/msg/Image with packed rows from a uint8 HxW or HxWxC array already in
    ``encoding``'s channel order (mono8, rgb8, bgr8, rgba8, bgra8)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    channels = 1 if image.ndim == 2 else image.shape[2]
    if _IMAGE_CHANNELS.get(encoding) != channels:
        raise ValueError(f"a {channels}-channel image cannot be published as {encoding!r}")
    height, width = image.shape[:2]
    return typestore.types[IMAGE_TYPE](
        header=header, height=height, width=width, encoding=encoding, is_bigendian=0,
        step=width * channels, data=image.reshape(-1))


def compressed_image_msg(typestore, data: bytes, fmt: str, header):
    """sensor_msgs/msg/CompressedImage holding already-encoded bytes (``fmt``: jpeg, png)."""
    return typestore.types[COMPRESSED_TYPE](
        header=header, format=fmt, data=np.frombuffer(bytes(data), dtype=np.uint8).copy())


# --- writing -----------------------------------------------------------------------

def _storage_plugin(storage: str) -> StoragePlugin:
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}: use one of {', '.join(STORAGES)}")
    return StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3


class AtomicBagWriter:
    """A rosbags Writer (rosbag2 format 9) that builds the bag in a hidden directory
    beside ``path`` and moves it into place only when closed without error; on error
    (or Ctrl-C) the partial bag is deleted, so ``path`` is either complete or untouched.

    Use as a context manager. ``overwrite`` replaces an existing bag at ``path``.
    """

    def __init__(self, path: str | Path, storage: str = "sqlite3", overwrite: bool = False):
        self.path = Path(path)
        self.storage = storage
        self._plugin = _storage_plugin(storage)
        if self.path.exists() and not overwrite:
            raise BagError(f"output {str(self.path)!r} exists already (use --overwrite to replace it)")
        self.overwrite = overwrite
        self._tmpdir: Path | None = None
        self._writer: Writer | None = None
        self._connections: dict = {}

    def __enter__(self) -> AtomicBagWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent))
        self._writer = Writer(self._tmpdir / self.path.name, version=Writer.VERSION_LATEST,
                              storage_plugin=self._plugin)
        self._writer.open()
        return self

    def add_connection(self, topic: str, msgtype: str, typestore=None, msgdef: str | None = None,
                       rihs01: str | None = None, qos: Sequence = ()):
        """Register a topic once (definition from ``typestore``, or ``msgdef``+``rihs01``)."""
        key = (topic, msgtype)
        if key not in self._connections:
            self._connections[key] = self._writer.add_connection(
                topic, msgtype, typestore=typestore, msgdef=msgdef, rihs01=rihs01,
                offered_qos_profiles=list(qos))
        return self._connections[key]

    def write(self, connection, log_ns: int, data) -> None:
        self._writer.write(connection, int(log_ns), data)

    def __exit__(self, exc_type, exc, tb) -> bool:
        writer, self._writer = self._writer, None
        tmpdir, self._tmpdir = self._tmpdir, None
        try:
            if exc_type is None:
                writer.close()
                self._move_into_place(tmpdir / self.path.name)
            else:
                try:
                    writer.abort()
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return False

    def _move_into_place(self, built: Path) -> None:
        if self.path.exists() or self.path.is_symlink():
            if not self.overwrite:
                raise BagError(f"output {str(self.path)!r} appeared while writing; "
                               f"not overwriting it")
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
            os.replace(built, self.path)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(built, self.path)


__all__ = [
    "AtomicBagWriter", "BagError", "COMPRESSED_TYPE", "IMAGE_TYPE", "IMAGE_TYPES",
    "ImageDecodeError", "KEYPOINTS_TYPE", "MATCHES_TYPE", "RawFrame", "STORAGES",
    "compressed_image_msg", "decode_compressed", "decode_image_fields", "decode_image_msg",
    "describe_image_topics", "detect_storage", "header_msg", "header_stamp_from_cdr",
    "image_connections", "image_encoding", "image_msg", "iter_frames", "keypoints_from_msg",
    "keypoints_msg", "kp_ros_typestore", "matches_from_msg", "matches_msg", "msg_dir",
    "TRACKS_TYPE", "tracks_msg",
    "open_bag", "read_messages", "stamp_to_ns", "time_msg",
]


def check_output_apart(input_path: str | Path, output_path: str | Path) -> None:
    """BagError unless ``output_path`` is apart from ``input_path``: not the same path, not
    inside it, not containing it, after resolving symlinks, ``.``/``..`` and a bare
    .db3/.mcap input file (its directory counts). An output is replaced with --overwrite,
    so any overlap would delete the input."""
    source = Path(input_path).resolve()
    target = Path(output_path).resolve()
    sources = {source, source.parent} if source.is_file() else {source}
    for path in sources:
        if target == path or target in path.parents or path in target.parents:
            relation = ("is" if target == path else "contains" if target in path.parents else "is inside")
            raise BagError(f"output {str(output_path)!r} {relation} the input {str(input_path)!r} "
                           f"({str(target)!r}): writing it would destroy the input; choose another output")
