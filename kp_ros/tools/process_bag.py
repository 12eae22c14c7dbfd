"""process_bag: every frame of a recorded image topic through SuperPoint and/or
EfficientLoFTR, into an output bag. Offline and deterministic; no ROS install needed.

Reads a rosbag2 bag (sqlite3 or MCAP) and one image topic (sensor_msgs/msg/Image or
CompressedImage, detected from the bag). Frames are processed in header-stamp order
(--order receive: in recorded order, as a live node would see a replay). Writes:

  <prefix>/keypoints                  kp_ros/msg/Keypoints, one per frame
  <prefix>/matches                    kp_ros/msg/Matches, each frame against the previous
                                      one (header = newer frame, stamp0 = older frame)
  <prefix>/superpoint_node/debug_image, <prefix>/eloftr_node/debug_image
                                      with --debug-images (sensor_msgs/Image rgb8)

<prefix> defaults to the image topic's namespace (/camera/image_raw -> /camera), the
names superpoint_node / eloftr_node publish under when launched in that namespace.
Header stamps are copied from the images; each output's bag (receive) time is its
input frame's. The message definitions go into the bag, so `ros2 bag info/play` work.

A frame where the stream breaks (stamp backwards or jumping more than --max-frame-gap,
size or encoding change) resets the matcher: no Matches for it. Undecodable frames are
skipped. Both are counted, with reasons, in the summary. The bag is written under a
temporary name and renamed when complete: a failed run leaves no partial output.

Options default to the nodes' config/matcher.yaml (so a bag gives what the live nodes
give); --params-file reads another ROS YAML (superpoint_node: ros__parameters: {...},
eloftr_node: ...), --params-file none uses the core models' defaults; flags override.

Exit codes: 0 done, 1 bad input or option, 2 model weights unavailable, 130 interrupted.

    process_bag tum.bag tum_features.bag --topic /camera/image_raw --max-keypoints 1024
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

try:  # ~1.5 s of imports: a Ctrl-C here is one line and exit 130, not a traceback
    import numpy as np

    from kp_ros.core.bag_io import (IMAGE_TYPE, KEYPOINTS_TYPE, MATCHES_TYPE, package_file,
                                    STORAGES, check_output_apart, AtomicBagWriter, BagError,
                                    decode_image_msg, detect_storage, image_connections,
                                    image_encoding, image_msg, iter_frames, keypoints_msg,
                                    kp_ros_typestore, matches_msg, open_bag, read_messages,
                                    stamp_to_ns)
    from kp_ros.core import params
    from kp_ros.core.pipeline import FeaturePipeline
except KeyboardInterrupt:
    print("process_bag: interrupted; no output bag written", file=sys.stderr)
    raise SystemExit(130) from None  # EXIT_INTERRUPTED, not defined yet

SUPERPOINT_MODEL = params.spec("superpoint_node", "model").default
ELOFTR_MODEL = params.spec("eloftr_node", "model").default
MAX_FRAME_GAP = params.spec("eloftr_node", "max_frame_gap").default

# The nodes' ROS parameters that map 1:1 to keywords of the core classes.
DETECTOR_PARAMS = ("model", "device", "keypoint_threshold", "nms_radius", "max_keypoints",
                   "resize", "fp16", "precision")
MATCHER_PARAMS = ("model", "device", "match_threshold", "max_matches", "resize",
                  "geometric_verification", "ransac_reproj_threshold", "fp16", "precision")
# Model flags (each a parameter of kp_ros/core/params.py) -> (the nodes it sets, parameter).
_BOTH = ("superpoint_node", "eloftr_node")
MODEL_FLAGS = {
    "superpoint_model": (("superpoint_node",), "model"), "eloftr_model": (("eloftr_node",), "model"),
    "device": (_BOTH, "device"), "precision": (_BOTH, "precision"), "fp16": (_BOTH, "fp16"),
    "resize": (_BOTH, "resize"),
    **{name: (("superpoint_node",), name) for name in ("keypoint_threshold", "nms_radius",
                                                        "max_keypoints")},
    **{name: (("eloftr_node",), name) for name in ("match_threshold", "max_matches",
                                                    "geometric_verification",
                                                    "ransac_reproj_threshold", "max_frame_gap")},
}
EXIT_OK, EXIT_INPUT, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 130


# --- topics and parameters -----------------------------------------------------------

def default_prefix(image_topic: str) -> str:
    """The namespace of an image topic: /camera/image_raw[/compressed] -> /camera; /image -> ''."""
    parts = image_topic.strip("/").split("/")
    if len(parts) > 1 and parts[-1] == "compressed":
        parts = parts[:-1]
    return "/" + "/".join(parts[:-1]) if len(parts) > 1 else ""


def output_topics(prefix: str) -> dict[str, str]:
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    return {"keypoints": f"{prefix}/keypoints", "matches": f"{prefix}/matches",
            "tracks": f"{prefix}/tracks",
            "keypoints_debug": f"{prefix}/superpoint_node/debug_image",
            "matches_debug": f"{prefix}/eloftr_node/debug_image"}


def load_params_file(path: str | Path) -> tuple[dict, dict]:
    """(superpoint_node, eloftr_node) ros__parameters from a ROS 2 params YAML.

    Node keys may carry a namespace (/camera/superpoint_node); ``/**`` applies to both.
    Parameters that only make sense live (QoS, debug_image, ...) are ignored.
    """
    import yaml

    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise BagError(f"cannot read params file {str(path)!r}: {err}") from err
    if not isinstance(document, dict):
        raise BagError(f"params file {str(path)!r}: expected a mapping of node names")
    found = {"**": {}, "superpoint_node": {}, "eloftr_node": {}}
    for key, entry in document.items():
        name = str(key).rstrip("/").split("/")[-1]
        if name in found and isinstance(entry, dict):
            found[name].update(entry.get("ros__parameters") or {})
    superpoint = {**found["**"], **found["superpoint_node"]}
    eloftr = {**found["**"], **found["eloftr_node"]}
    return superpoint, eloftr


def default_params_file() -> str | None:
    try:
        return str(package_file("config/matcher.yaml"))
    except BagError:
        return None


def resolve_options(args: argparse.Namespace) -> tuple[dict, dict, float]:
    """Detector kwargs, matcher kwargs and max_frame_gap: core defaults <- params file <- flags."""
    use_file = args.params_file and str(args.params_file).lower() != "none"
    file_sp, file_lo = load_params_file(args.params_file) if use_file else ({}, {})
    options = {"superpoint_node": {"model": SUPERPOINT_MODEL} | file_sp,
               "eloftr_node": {"model": ELOFTR_MODEL} | file_lo}
    for flag, (nodes, name) in MODEL_FLAGS.items():
        if getattr(args, flag, None) is not None:
            for node in nodes:
                options[node][name] = getattr(args, flag)
    detector = {k: v for k, v in options["superpoint_node"].items() if k in DETECTOR_PARAMS}
    matcher = {k: v for k, v in options["eloftr_node"].items() if k in MATCHER_PARAMS}
    return detector, matcher, float(options["eloftr_node"].get("max_frame_gap", MAX_FRAME_GAP))


def add_model_flags(group) -> None:
    """One flag per MODEL_FLAGS entry: type, choices and text from the parameter spec."""
    metavars = {"superpoint_model": "ID_OR_DIR", "eloftr_model": "ID_OR_DIR", "device": "DEVICE",
                "max_frame_gap": "SECONDS", "ransac_reproj_threshold": "PX", "nms_radius": "PX"}
    for flag, (nodes, name) in MODEL_FLAGS.items():
        spec = params.spec(nodes[0], name)
        default = f"default {spec.default}"
        if spec.core_value != spec.default:
            default += f"; {spec.core_value} with --params-file none"
        text = f"{spec.description} ({default})".replace("%", "%%")
        if len(nodes) == 1 and name != "model":
            text = ("SuperPoint: " if nodes[0] == "superpoint_node" else "EfficientLoFTR: ") + text
        kwargs = {"help": text}
        if spec.type is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        elif spec.choices:
            kwargs.update(choices=spec.choices)
        else:
            kwargs.update(type=spec.type, metavar=metavars.get(flag, "N" if spec.type is int else "S"))
        group.add_argument("--" + flag.replace("_", "-"), **kwargs)


# --- summary -------------------------------------------------------------------------

def reason_key(reason: str) -> str:
    """Group reasons that differ only in numbers ('stamp jumped 3.1 s' ~ 'stamp jumped 7.0 s')."""
    return re.sub(r"-?\d+(\.\d+)?", "#", reason)[:120]


@dataclass
class Summary:
    input: str = ""
    output: str = ""
    topic: str = ""
    msgtype: str = ""
    storage: str = ""
    frames: int = 0             # image messages read
    processed: int = 0          # frames that produced their outputs
    keypoints_msgs: int = 0
    keypoints_total: int = 0
    matches_msgs: int = 0
    matches_total: int = 0
    inliers_total: int = 0
    tracks_msgs: int = 0
    tracks_linked: int = 0      # keypoints linked to the previous frame's, over all frames
    copied: int = 0             # input messages copied through
    seconds: float = 0.0
    rejected: Counter = field(default_factory=Counter)  # reason_key -> frames
    resets: Counter = field(default_factory=Counter)    # reason_key -> stream resets
    examples: dict = field(default_factory=dict)        # reason_key -> first full reason
    events: list = field(default_factory=list)          # (kind, reason) of the current frame

    def note(self, counter: Counter, reason: str) -> None:
        key = reason_key(reason)
        counter[key] += 1
        self.examples.setdefault(key, reason)
        self.events.append(("frame rejected" if counter is self.rejected else "stream reset", reason))

    def text(self) -> str:
        def per(total, msgs):
            return f"{total / msgs:.1f}" if msgs else "-"
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"process_bag: {self.input} {self.topic} ({self.msgtype}) -> {self.output} ({self.storage})",
            f"  frames            {self.frames} read, {self.processed} processed "
            f"in {self.seconds:.1f} s ({rate:.2f} frames/s)",
            f"  keypoints         {self.keypoints_msgs} messages, {per(self.keypoints_total, self.keypoints_msgs)} keypoints/frame",
            f"  matches           {self.matches_msgs} messages, {per(self.matches_total, self.matches_msgs)} matches/frame"
            + (f", {per(self.inliers_total, self.matches_msgs)} inliers/frame" if self.inliers_total else ""),
            f"  rejected frames   {sum(self.rejected.values())}",
        ]
        if self.tracks_msgs:
            lines.insert(-1, f"  tracks            {self.tracks_msgs} messages, "
                             f"{per(self.tracks_linked, self.tracks_msgs)} linked keypoints/frame")
        lines += [f"    {n} x {self.examples[k]}" for k, n in self.rejected.most_common()]
        lines.append(f"  stream resets     {sum(self.resets.values())}")
        lines += [f"    {n} x {self.examples[k]}" for k, n in self.resets.most_common()]
        if self.copied:
            lines.append(f"  copied through    {self.copied} input messages")
        return "\n".join(lines)


# --- processing ----------------------------------------------------------------------

class FrameProcessor:
    """One frame in, its output messages out: decode -> detect -> continuity -> match.

    A frame either yields all its outputs or is rejected (with the reason) and yields
    none; a failure inside the matcher also restarts the stream, so the next Matches
    never pairs with a frame the matcher did not finish.
    """

    def __init__(self, typestore, topics: dict, detector=None, matcher=None,
                 max_frame_gap: float = MAX_FRAME_GAP, debug_images: bool = False,
                 detector_name: str | None = None, matcher_name: str | None = None,
                 tracks=None):
        self.typestore, self.topics = typestore, topics
        self.book = None  # tracks: a TrackBook when ``tracks`` (TrackParams) is given
        if tracks is not None:
            from kp_ros.core.tracks import TrackBook
            if detector is None or matcher is None:
                raise ValueError("tracks need both the detector and the matcher")
            self.book = TrackBook(tracks)
        self._frame_keypoints = self._frame_matches = None
        self.detector, self.matcher = detector, matcher
        self.detector_name = detector_name or (detector.model_id if detector else "")
        self.matcher_name = matcher_name or (matcher.model_id if matcher else "")
        # Continuity, pairing, resets and overlays: kp_ros/core/pipeline.py, as in the nodes.
        self.pipeline = FeaturePipeline(detector, matcher, max_frame_gap)
        self.debug_images = debug_images

    def process(self, data, msgtype: str, summary: Summary) -> list[tuple[str, str, object]] | None:
        """[(topic, msgtype, message)] for one serialized frame, or None if rejected."""
        try:
            msg = self.typestore.deserialize_cdr(data, msgtype)
        except Exception as err:  # noqa: BLE001 - any garbage in a message is that frame's problem
            summary.note(summary.rejected, f"undeserializable {msgtype} ({type(err).__name__}: {err})")
            return None
        try:
            image = decode_image_msg(msg, msgtype)
        except ValueError as err:
            summary.note(summary.rejected, f"undecodable image: {err}")
            return None
        try:
            outputs = self._detect(msg, image) if self.detector is not None else []
        except ValueError as err:
            summary.note(summary.rejected, f"detector: {err}")
            return None
        if self.matcher is not None:
            try:
                outputs += self._match(msg, msgtype, image, summary)
            except ValueError as err:  # the pipeline restarted the stream
                summary.note(summary.rejected, f"matcher: {err}")
                return None
        if self.book is not None:
            outputs += self._track(msg, image)
        return outputs

    def _track(self, msg, image) -> list:
        from kp_ros.core.bag_io import TRACKS_TYPE, tracks_msg
        tracks = self.book.add(stamp_to_ns(msg.header.stamp), self._frame_keypoints, self._frame_matches)
        height, width = image.shape[:2]
        return [(self.topics["tracks"], TRACKS_TYPE, tracks_msg(self.typestore, msg.header, height, width, tracks))]

    def _detect(self, msg, image) -> list:
        found = self.pipeline.detect(image, overlay=self.debug_images)
        self._frame_keypoints = found.keypoints
        height, width = image.shape[:2]
        out = [(self.topics["keypoints"], KEYPOINTS_TYPE, keypoints_msg(
            self.typestore, msg.header, height, width, self.detector_name,
            found.keypoints, found.scores, found.descriptors))]
        if found.overlay is not None:
            out.append((self.topics["keypoints_debug"], IMAGE_TYPE,
                        image_msg(self.typestore, found.overlay, "rgb8", msg.header)))
        return out

    def _match(self, msg, msgtype: str, image, summary: Summary) -> list:
        height, width = image.shape[:2]
        step = self.pipeline.match(image, stamp_to_ns(msg.header.stamp), image_encoding(msg, msgtype),
                                   token=msg.header, overlay=self.debug_images)
        if step.reset:
            summary.note(summary.resets, step.reset)
        self._frame_matches = None
        if step.matches is None:
            return []
        found, header0 = step.matches, step.previous
        inliers = found["inliers"] if len(found["inliers"]) else None
        if self.book is not None:
            from kp_ros.core.tracks import MatchSet
            self._frame_matches = MatchSet(
                stamp_to_ns(msg.header.stamp), stamp_to_ns(header0.stamp), found["keypoints0"],
                found["keypoints1"], found["scores"], inliers)
        out = [(self.topics["matches"], MATCHES_TYPE, matches_msg(
            self.typestore, msg.header, header0.stamp, header0.frame_id, height, width,
            self.matcher_name, found["keypoints0"], found["keypoints1"], found["scores"], inliers))]
        if step.overlay is not None:
            out.append((self.topics["matches_debug"], IMAGE_TYPE,
                        image_msg(self.typestore, step.overlay, "rgb8", msg.header)))
        return out


def camera_info_topic(image_topic: str) -> str:
    """camera_info beside the image, as image_pipeline expects: /cam/image_raw -> /cam/camera_info."""
    return f"{default_prefix(image_topic)}/camera_info"


def use_camera_info(reader, typestore, matcher, image_topic: str, log) -> None:
    """Give ``matcher`` the calibration of the bag's first CameraInfo beside the image
    topic (intrinsics are taken as fixed for the bag), or say why it runs 'fundamental'."""
    from kp_ros.core.geometry import camera_from_info
    topic = camera_info_topic(image_topic)
    matcher.camera = None
    connections = [c for c in reader.connections if c.topic == topic
                   and c.msgtype == "sensor_msgs/msg/CameraInfo"]
    # An empty connection list would make the reader return every topic.
    for _, _, data in read_messages(reader, connections) if connections else ():
        info = typestore.deserialize_cdr(data, "sensor_msgs/msg/CameraInfo")
        try:
            matcher.camera = camera_from_info(info.k, info.d, info.distortion_model, info.width, info.height)
        except ValueError as err:
            log(f"geometric_verification essential: {topic}: {err}; verifying with a fundamental matrix")
        return
    log(f"geometric_verification essential: no sensor_msgs/CameraInfo on {topic} in the bag; "
        f"verifying with a fundamental matrix")


def _copy_connection(writer: AtomicBagWriter, typestore, connection):
    """The output connection for an input one: its own definition and QoS when the bag
    carries them, else the typestore's; None when neither knows the type."""
    msgdef = connection.msgdef
    qos = getattr(connection.ext, "offered_qos_profiles", ())
    if msgdef.data and connection.digest and (msgdef.format.name == "MSG" or msgdef.data.startswith("=" * 80)):
        return writer.add_connection(connection.topic, connection.msgtype, msgdef=msgdef.data,
                                     rihs01=connection.digest, qos=qos)
    if connection.msgtype in typestore.fielddefs:
        return writer.add_connection(connection.topic, connection.msgtype, typestore=typestore, qos=qos)
    return None


def process_bag(input_path, output_path, detector=None, matcher=None, *, topic: str | None = None,
                storage: str | None = None, prefix: str | None = None,
                max_frame_gap: float = MAX_FRAME_GAP, order: str = "stamp",
                debug_images: bool = False, copy_input: bool = False, overwrite: bool = False,
                progress: bool = False, detector_name: str | None = None,
                matcher_name: str | None = None, log=None, on_frame=None, tracks=None) -> Summary:
    """Run ``detector`` (SuperPointDetector) and/or ``matcher`` (EfficientLoFTRStreamMatcher)
    on every frame of ``topic`` and write the output bag; returns the counts.
    ``on_frame(frames_read)`` is called after each frame (progress for process_bags).
    ``tracks`` (kp_ros.core.tracks.TrackParams) also writes kp_ros/Tracks on <prefix>/tracks.

    Raises BagError for unusable input (missing, corrupt, wrong topic) or output (exists
    and not ``overwrite``); on any error no output bag is left behind.
    """
    from tqdm import tqdm

    if detector is None and matcher is None:
        raise ValueError("nothing to do: enable the detector, the matcher or both")
    log = log or (lambda text: tqdm.write(text, file=sys.stderr))
    check_output_apart(input_path, output_path)
    typestore = kp_ros_typestore()
    storage = storage or detect_storage(input_path)
    reader = open_bag(input_path)
    try:
        topic, msgtype, connections = image_connections(reader, topic)
        topics = output_topics(default_prefix(topic) if prefix is None else prefix)
        if matcher is not None and matcher.params["geometric_verification"] == "essential":
            use_camera_info(reader, typestore, matcher, topic, log)
        if copy_input:
            clash = {c.topic for c in reader.connections} & set(topics.values())
            if clash:
                raise BagError(f"--copy-input: input topic(s) {', '.join(sorted(clash))} clash with "
                               f"the outputs; choose another --output-prefix")
        summary = Summary(str(input_path), str(output_path), topic, msgtype, storage)
        processor = FrameProcessor(typestore, topics, detector, matcher, max_frame_gap,
                                   debug_images, detector_name, matcher_name, tracks)
        total = sum(c.msgcount for c in connections)
        logged = Counter()
        from kp_ros.core.bag_io import TRACKS_TYPE
        with AtomicBagWriter(output_path, storage, overwrite) as writer:
            out_connections = {}
            image_copy = _copy_connection(writer, typestore, connections[0]) if copy_input else None
            started = time.perf_counter()
            bar = tqdm(total=total, unit="frame", disable=not progress, dynamic_ncols=True,
                       desc="process_bag", file=sys.stderr)
            try:
                for frame in iter_frames(reader, connections, order):
                    summary.frames += 1
                    summary.events.clear()
                    outputs = processor.process(frame.data, msgtype, summary)
                    for what, reason in summary.events:
                        logged[what] += 1
                        if logged[what] <= 5:  # the summary has them all, grouped
                            log(f"{what} (frame stamped {frame.stamp_ns / 1e9:.6f}): {reason}")
                    if image_copy is not None:
                        writer.write(image_copy, frame.log_ns, frame.data)
                        summary.copied += 1
                    bar.update(1)
                    if on_frame is not None:
                        on_frame(summary.frames)
                    if outputs is None:
                        continue
                    summary.processed += 1
                    for out_topic, out_type, message in outputs:
                        if out_topic not in out_connections:
                            out_connections[out_topic] = writer.add_connection(out_topic, out_type, typestore)
                        writer.write(out_connections[out_topic], frame.log_ns,
                                     typestore.serialize_cdr(message, out_type))
                        if out_type == KEYPOINTS_TYPE:
                            summary.keypoints_msgs += 1
                            summary.keypoints_total += len(message.x)
                        elif out_type == MATCHES_TYPE:
                            summary.matches_msgs += 1
                            summary.matches_total += len(message.x0)
                            summary.inliers_total += int(np.count_nonzero(message.inliers))
                        elif out_type == TRACKS_TYPE:
                            summary.tracks_msgs += 1
                            summary.tracks_linked += int(np.count_nonzero(message.previous_index >= 0))
            finally:
                bar.close()
            summary.seconds = time.perf_counter() - started
            if copy_input:
                summary.copied += _copy_other_topics(reader, writer, typestore, topic, log)
            # Declare every output topic, also when no message came (e.g. one frame, no
            # Matches), so a consumer of the bag finds the topics it expects.
            wanted = [("keypoints", KEYPOINTS_TYPE)] if detector is not None else []
            wanted += [("matches", MATCHES_TYPE)] if matcher is not None else []
            wanted += [("tracks", TRACKS_TYPE)] if tracks is not None else []
            for key, out_type in wanted:
                if topics[key] not in out_connections:
                    writer.add_connection(topics[key], out_type, typestore)
    finally:
        reader.close()
    return summary


def _copy_other_topics(reader, writer: AtomicBagWriter, typestore, image_topic: str, log) -> int:
    copied, targets = 0, {}
    for connection in reader.connections:
        if connection.topic == image_topic:
            continue
        target = _copy_connection(writer, typestore, connection)
        if target is None:
            log(f"--copy-input: skipping {connection.topic} ({connection.msgtype}): the bag has "
                f"no definition for that type")
            continue
        targets[connection.id] = (connection, target)
    if not targets:
        return 0
    for connection, log_ns, data in read_messages(reader, [c for c, _ in targets.values()]):
        writer.write(targets[connection.id][1], log_ns, data)
        copied += 1
    return copied


# --- models and determinism ----------------------------------------------------------

@contextmanager
def deterministic_torch(threads: int | None):
    """Deterministic algorithms (warn where none exists) and an optional fixed thread
    count, restored afterwards: the same bag, options and thread count give
    byte-identical messages."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads())
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)  # random-init weights make denormals, ~8x slower on CPU
    if threads:
        torch.set_num_threads(threads)
    try:
        import cv2
        cv2.setRNGSeed(0)  # geometric verification (RANSAC) draws from OpenCV's RNG
        torch.manual_seed(0)
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])


def loud_warning(text: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n{text}\n{bar}\n", file=sys.stderr)


def load_models(detector_kwargs: dict | None, matcher_kwargs: dict | None,
                random_init_fallback: bool, workdir: Path):
    """(detector, matcher, detector_name, matcher_name); ModelUnavailableError unless
    ``random_init_fallback``, which substitutes full-size random-init models saved in
    ``workdir`` and names them so in every message."""
    from kp_ros.core.model_loading import ModelUnavailableError

    def load(kind: str, kwargs: dict):
        if kind == "superpoint":
            from kp_ros.core.random_init import save_random_superpoint as save
            from kp_ros.core.superpoint import SuperPointDetector as cls
        else:
            from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher as cls
            from kp_ros.core.random_init import save_random_eloftr as save
        try:
            return cls(**kwargs), None
        except ModelUnavailableError as err:
            if not random_init_fallback:
                raise
            loud_warning(f"WARNING: {err}\nWARNING: --random-init-fallback: using a RANDOM-INIT "
                         f"full-size {kind} model instead. Its outputs are meaningless (the "
                         f"pipeline runs, the features are noise).")
            directory = save(workdir / kind, "full", seed=0)
            return cls(**{**kwargs, "model": str(directory)}), f"random-init({kwargs['model']})"

    detector, detector_name = load("superpoint", detector_kwargs) if detector_kwargs else (None, None)
    matcher, matcher_name = load("eloftr", matcher_kwargs) if matcher_kwargs else (None, None)
    return detector, matcher, detector_name, matcher_name


# --- command line --------------------------------------------------------------------

def build_parser(prog: str = "process_bag", description: str = __doc__,
                 positionals: bool = True) -> argparse.ArgumentParser:
    """The options; ``positionals=False`` leaves out input/output (process_bags adds its own)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if positionals:
        parser.add_argument("input", help="rosbag2 bag (directory, or a .db3/.mcap file)")
        parser.add_argument("output", help="output bag directory to create")
    parser.add_argument("--topic", help="image topic (default: the bag's only image topic)")
    parser.add_argument("--output-prefix", dest="prefix", default=None,
                        help="namespace of the output topics (default: the image topic's namespace)")
    parser.add_argument("--storage", choices=STORAGES, help="output storage (default: as the input)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output bag")
    parser.add_argument("--detector", action=argparse.BooleanOptionalAction, default=True,
                        help="run SuperPoint -> <prefix>/keypoints (default: on)")
    parser.add_argument("--matcher", action=argparse.BooleanOptionalAction, default=True,
                        help="run EfficientLoFTR -> <prefix>/matches (default: on)")
    parser.add_argument("--debug-images", action="store_true", help="also write the debug overlays")
    parser.add_argument("--tracks", action="store_true",
                        help="also write kp_ros/Tracks (track ids over frames, as track_node) on <prefix>/tracks")
    association = params.spec("track_node", "association")
    radius = params.spec("track_node", "association_radius")
    parser.add_argument("--association", choices=association.choices, default=association.default,
                        help=f"with --tracks: how matches link keypoints (default "
                             f"{association.default}; see track_node)")
    parser.add_argument("--association-radius", type=float, default=radius.default, metavar="PX",
                        help=f"with --tracks: link radius in pixels (default {radius.default})")
    parser.add_argument("--copy-input", action="store_true",
                        help="copy every input topic into the output bag too")
    parser.add_argument("--order", choices=("stamp", "receive"), default="stamp",
                        help="process frames by header stamp (default) or in recorded order")
    parser.add_argument("--params-file", metavar="YAML", default=default_params_file(),
                        help="the nodes' ROS 2 params file (superpoint_node/eloftr_node "
                             "ros__parameters); default: %(default)s; 'none': the core defaults")

    # None here = not given: the params file (or the core default) applies.
    models = parser.add_argument_group("models (default: the params file, or the core defaults)")
    add_model_flags(models)
    models.add_argument("--random-init-fallback", action="store_true",
                        help="if pretrained weights are unavailable, use RANDOM-INIT models "
                             "(meaningless features; for demos and pipeline tests) instead of failing")

    run = parser.add_argument_group("run")
    run.add_argument("--threads", type=int, default=None, metavar="N",
                     help="torch CPU threads (default: torch's); fix it for reproducible runs")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="tqdm progress bar on stderr (default: on)")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def fail(code: int, text: str) -> int:
    print(f"process_bag: error: {text}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the run started (option and input checks): no traceback
        print("process_bag: interrupted; no output bag written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if not (args.detector or args.matcher):
        return fail(EXIT_INPUT, "--no-detector and --no-matcher: nothing to do")
    if args.tracks and not (args.detector and args.matcher):
        return fail(EXIT_INPUT, "--tracks needs both the detector and the matcher")
    try:
        track_params(args)
    except ValueError as err:
        return fail(EXIT_INPUT, str(err))
    try:
        detector_kwargs, matcher_kwargs, max_frame_gap = resolve_options(args)
        # Check the input before spending time on the models.
        reader = open_bag(args.input)
        try:
            image_connections(reader, args.topic)
        finally:
            reader.close()
        check_output_apart(args.input, args.output)
        if Path(args.output).exists() and not args.overwrite:
            raise BagError(f"output {args.output!r} exists already (use --overwrite to replace it)")
    except (BagError, ValueError) as err:
        return fail(EXIT_INPUT, str(err))

    # SIGTERM ends the run like Ctrl-C: the partial output is removed, not left behind.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args, detector_kwargs, matcher_kwargs, max_frame_gap)
    except KeyboardInterrupt:
        print(f"process_bag: interrupted; no output bag written ({args.output} untouched)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


def track_params(args):
    """TrackParams from --tracks / --association / --association-radius, or None."""
    if not getattr(args, "tracks", False):
        return None
    from kp_ros.core.tracks import TrackParams
    return TrackParams(association=args.association,
                       association_radius=args.association_radius).validated()


class ModelLoadError(ValueError):
    """An invalid model option, raised while loading (not a problem of the bag)."""


def run_one(args, input_path, output_path, detector_kwargs: dict, matcher_kwargs: dict,
            max_frame_gap: float, *, progress: bool | None = None, on_frame=None, log=None) -> Summary:
    """One bag with process_bag's options (``args`` from build_parser(), resolved by
    resolve_options): load the models, process, return the summary. The one per-bag
    pipeline: process_bag's main and process_bags' Ray tasks both call it, so their
    outputs are byte-identical. Raises ModelUnavailableError, ModelLoadError, BagError,
    ValueError, or the model's own error; never leaves a partial output."""
    with tempfile.TemporaryDirectory(prefix="kp_ros_random_init_") as workdir, \
            deterministic_torch(args.threads), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deterministic.*")
        try:
            detector, matcher, detector_name, matcher_name = load_models(
                detector_kwargs if args.detector else None, matcher_kwargs if args.matcher else None,
                args.random_init_fallback, Path(workdir))
        except ValueError as err:
            raise ModelLoadError(str(err)) from err
        return process_bag(
            input_path, output_path, detector, matcher, topic=args.topic, storage=args.storage,
            prefix=args.prefix, max_frame_gap=max_frame_gap, order=args.order,
            debug_images=args.debug_images, copy_input=args.copy_input,
            overwrite=args.overwrite, progress=args.progress if progress is None else progress,
            detector_name=detector_name, matcher_name=matcher_name, log=log, on_frame=on_frame,
            tracks=track_params(args))


def _run(args, detector_kwargs: dict, matcher_kwargs: dict, max_frame_gap: float) -> int:
    """main() after the argument checks: load the models, process, print the summary."""
    from kp_ros.core.model_loading import ModelUnavailableError

    try:
        summary = run_one(args, args.input, args.output, detector_kwargs, matcher_kwargs, max_frame_gap)
    except ModelUnavailableError as err:
        return fail(EXIT_MODEL, f"{err}\n(or pass --random-init-fallback to run the pipeline "
                                f"with random-init models)")
    except ModelLoadError as err:
        return fail(EXIT_INPUT, str(err))
    except (BagError, ValueError) as err:
        return fail(EXIT_INPUT, f"{err}\nno output bag written ({args.output} untouched)")
    except Exception:  # noqa: BLE001 - a model failure: say so, leave no output
        traceback.print_exc()
        return fail(EXIT_INPUT, f"processing failed; no output bag written ({args.output} untouched)")
    print(summary.text())
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
