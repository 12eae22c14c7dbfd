"""process_bag's bag loop: every frame of the image topic through a FrameProcessor, its
outputs (and, with --copy-input, the other topics) into an AtomicBagWriter."""
from __future__ import annotations

import sys
import time
from collections import Counter

import numpy as np

from kp_ros.bags.messages import KEYPOINTS_TYPE, MATCHES_TYPE, POINT_CLOUD_TYPE, TRACKS_TYPE
from kp_ros.bags.reader import BagError, image_connections, iter_frames, read_messages
from kp_ros.bags.writer import AtomicBagWriter
from kp_ros.offline.frame_processor import FrameProcessor, open_input, read_camera, use_camera_info
from kp_ros.offline.options import MAX_FRAME_GAP, default_prefix, output_topics
from kp_ros.offline.summary import Summary


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
                matcher_name: str | None = None, log=None, on_frame=None, tracks=None,
                vins: str | None = None) -> Summary:
    """Run ``detector`` (SuperPointDetector) and/or ``matcher`` (EfficientLoFTRStreamMatcher)
    on every frame of ``topic`` and write the output bag; returns the counts.
    ``on_frame(frames_read)`` is called after each frame (progress for process_bags).
    ``tracks`` (kp_ros.core.tracks.TrackParams) also writes kp_ros/Tracks on <prefix>/tracks;
    ``vins`` ('fusion' | 'mono', with ``tracks``) their VINS feature clouds on <prefix>/feature
    (sensor_msgs/PointCloud; the calibration from the bag's CameraInfo beside the images).

    Raises BagError for unusable input (missing, corrupt, wrong topic) or output (exists
    and not ``overwrite``); on any error no output bag is left behind.
    """
    if detector is None and matcher is None:
        raise ValueError("nothing to do: enable the detector, the matcher or both")
    log, typestore, storage, reader = open_input(input_path, output_path, storage, log)
    try:
        topic, msgtype, connections = image_connections(reader, topic)
        topics = output_topics(default_prefix(topic) if prefix is None else prefix)
        cameras = (read_camera(reader, typestore, topic, f"--vins {vins}"), None) if vins else (None, None)
        if matcher is not None and matcher.params.geometric_verification == "essential":
            use_camera_info(reader, typestore, matcher, topic, log)
        if copy_input:
            clash = {c.topic for c in reader.connections} & set(topics.values())
            if clash:
                raise BagError(f"--copy-input: input topic(s) {', '.join(sorted(clash))} clash with "
                               f"the outputs; choose another --output-prefix")
        summary = Summary(str(input_path), str(output_path), topic, msgtype, storage)
        processor = FrameProcessor(typestore, topics, detector, matcher, max_frame_gap,
                                   debug_images, detector_name, matcher_name, tracks, vins, cameras)
        with AtomicBagWriter(output_path, storage, overwrite) as writer:
            image_copy = _copy_connection(writer, typestore, connections[0]) if copy_input else None
            started = time.perf_counter()
            out_connections = _write_frames(reader, connections, msgtype, order, processor, writer,
                                            typestore, summary, image_copy, log, progress, on_frame)
            summary.seconds = time.perf_counter() - started
            if copy_input:
                summary.copied += _copy_other_topics(reader, writer, typestore, topic, log)
            # Declare every output topic, also when no message came (e.g. one frame, no
            # Matches), so a consumer of the bag finds the topics it expects.
            wanted = [("keypoints", KEYPOINTS_TYPE)] if detector is not None else []
            wanted += [("matches", MATCHES_TYPE)] if matcher is not None else []
            wanted += [("tracks", TRACKS_TYPE)] if tracks is not None else []
            wanted += [("feature", POINT_CLOUD_TYPE)] if vins else []
            for key, out_type in wanted:
                if topics[key] not in out_connections:
                    writer.add_connection(topics[key], out_type, typestore)
    finally:
        reader.close()
    return summary


def _write_frames(reader, connections, msgtype: str, order: str, processor: FrameProcessor,
                  writer: AtomicBagWriter, typestore, summary: Summary, image_copy, log,
                  progress: bool, on_frame) -> dict:
    """Every frame through ``processor``, its outputs written; the output connections made."""
    from tqdm import tqdm

    out_connections, logged = {}, Counter()
    bar = tqdm(total=sum(c.msgcount for c in connections), unit="frame", disable=not progress,
               dynamic_ncols=True, desc="process_bag", file=sys.stderr)
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
                _count(summary, out_type, message)
    finally:
        bar.close()
    return out_connections


def _count(summary: Summary, out_type: str, message) -> None:
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
