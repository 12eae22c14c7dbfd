"""process_bag --stereo: a stereo bag's left/right image topics, paired by stamp
(kp_ros/core/stereo_sync.py), through the pipeline's stereo step; writes per pair the left
and right Keypoints, the left camera's temporal Matches, the StereoMatches (disparity and
depth) and, with --tracks, Tracks carrying each keypoint's right observation and depth.
Deterministic: frames in stamp order (ties in recorded order), models as process_bag's."""
from __future__ import annotations

import sys
import time

import numpy as np

from kp_ros.bags.messages import (KEYPOINTS_TYPE, MATCHES_TYPE, POINT_CLOUD_TYPE,
                                  STEREO_MATCHES_TYPE, TRACKS_TYPE, IMAGE_TYPES, keypoints_msg,
                                  stereo_matches_msg)
from kp_ros.bags.reader import (BagError, decode_image_msg, describe_image_topics,
                                image_connections, iter_frames)
from kp_ros.bags.writer import AtomicBagWriter
from kp_ros.core.pipeline import FeaturePipeline
from kp_ros.core.stereo import StereoParams, StereoRig, rig_from_infos
from kp_ros.core.stereo_matching import StereoMatcher
from kp_ros.core.stereo_sync import StereoSync
from kp_ros.core.tracks import TrackParams
from kp_ros.offline.frame_processor import (CAMERA_INFO_TYPE, FrameProcessor, camera_info_topic,
                                            first_camera_info, open_input, read_camera)
from kp_ros.offline.options import MAX_FRAME_GAP, default_prefix
from kp_ros.offline.summary import Summary


def stereo_topics(reader, left: str | None, right: str | None) -> tuple[str, str]:
    """(left, right) image topics: as given, or the bag's only image topics with a 'left'
    and a 'right' path segment (image_pipeline: /stereo/left/image_rect). BagError if unclear."""
    images = sorted({c.topic for c in reader.connections if c.msgtype in IMAGE_TYPES})

    def pick(side: str, given: str | None) -> str:
        if given is not None:
            return given
        found = [t for t in images if side in t.strip("/").split("/")]
        if len(found) != 1:
            raise BagError(f"choose the {side} image topic with --{side}-topic: "
                           f"{describe_image_topics(reader)}")
        return found[0]
    return pick("left", left), pick("right", right)


def output_prefix(left_topic: str, right_topic: str) -> str:
    """The stereo camera's namespace: /stereo/left/image_rect + /stereo/right/... -> /stereo."""
    left, right = default_prefix(left_topic).split("/"), default_prefix(right_topic).split("/")
    common = []
    for a, b in zip(left, right):
        if a != b:
            break
        common.append(a)
    return "/".join(common)


def stereo_output_topics(prefix: str) -> dict[str, str]:
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    return {"keypoints": f"{prefix}/keypoints", "right_keypoints": f"{prefix}/right/keypoints",
            "matches": f"{prefix}/matches", "stereo_matches": f"{prefix}/stereo_matches",
            "tracks": f"{prefix}/tracks", "feature": f"{prefix}/feature",
            "keypoints_debug": f"{prefix}/frontend_node/debug_image",
            "matches_debug": f"{prefix}/frontend_node/matches_debug_image"}


def read_rig(reader, typestore, left_topic: str, right_topic: str) -> StereoRig:
    """The rig from the first CameraInfo beside each image topic (fixed for the bag)."""
    infos = []
    for image_topic in (left_topic, right_topic):
        info = first_camera_info(reader, typestore, image_topic)
        if info is None:
            return StereoRig(problem=f"no {CAMERA_INFO_TYPE} on {camera_info_topic(image_topic)} "
                                     f"in the bag: no depth")
        infos.append(info)
    return rig_from_infos(*infos)


class StereoFrameProcessor(FrameProcessor):
    """One stereo pair in, its output messages out (or None, rejected with the reason)."""

    def __init__(self, typestore, topics: dict, detector, matcher, rig: StereoRig,
                 stereo_params: StereoParams, max_frame_gap: float = MAX_FRAME_GAP,
                 tracks=None, log=print, detector_name=None, matcher_name=None, vins=None,
                 cameras=(None, None)):
        super().__init__(typestore, topics, detector, matcher, max_frame_gap,
                         detector_name=detector_name, matcher_name=matcher_name, tracks=tracks,
                         vins=vins, cameras=cameras)
        self.pipeline = FeaturePipeline(detector, matcher, max_frame_gap,
                                        stereo=StereoMatcher(matcher, stereo_params))
        # Every pair through the front-end step (kp_ros/core/frontend.py), as frontend_node
        # runs it; its tracks are written with --tracks only.
        self.write_tracks = tracks is not None
        self._use_frontend(tracks if tracks is not None else TrackParams())
        self.rig, self.log = rig, log

    def process_pair(self, left_data, right_data, msgtypes, summary: Summary) -> list | None:
        decoded = []
        for data, msgtype in zip((left_data, right_data), msgtypes):
            try:
                msg = self.typestore.deserialize_cdr(data, msgtype)
                decoded.append((msg, decode_image_msg(msg, msgtype)))
            except Exception as err:  # noqa: BLE001 - garbage in a message is that pair's problem
                summary.note(summary.rejected,
                             f"undecodable stereo image ({type(err).__name__}: {err})")
                return None
        (left_msg, left), (right_msg, right) = decoded
        stepped = self._frontend_step(left_msg, msgtypes[0], left, summary, right, self.rig)
        if stepped is None:
            return None
        outputs, result = stepped
        step = result.stereo
        if step.warning:
            self.log(f"stereo: {step.warning}")
        height, width = left.shape[:2]
        # Keypoints (left, right), Matches, StereoMatches, Tracks: process_bag's order.
        out = outputs[:1] + [self._keypoints("right_keypoints", right_msg, right,
                                             result.detection_right)] + outputs[1:]
        out.append((self.topics["stereo_matches"], STEREO_MATCHES_TYPE, stereo_matches_msg(
            self.typestore, left_msg.header, right_msg.header.stamp, right_msg.header.frame_id,
            height, width, self.matcher_name, step.matches, self.rig)))
        if self.write_tracks:
            out += self._tracks_outputs(left_msg, left, result, summary)
        return out

    def _keypoints(self, key: str, msg, image, found) -> tuple:
        height, width = image.shape[:2]
        return (self.topics[key], KEYPOINTS_TYPE, keypoints_msg(
            self.typestore, msg.header, height, width, self.detector_name, found.keypoints,
            found.scores, found.descriptors))


def _count(summary: Summary, out_type: str, message) -> None:
    if out_type == KEYPOINTS_TYPE:
        summary.keypoints_msgs += 1
        summary.keypoints_total += len(message.x)
    elif out_type == MATCHES_TYPE:
        summary.matches_msgs += 1
        summary.matches_total += len(message.x0)
    elif out_type == STEREO_MATCHES_TYPE:
        summary.stereo_msgs += 1
        summary.stereo_total += len(message.x_left)
        summary.stereo_depths += int(np.count_nonzero(np.isfinite(message.depth)))
    elif out_type == TRACKS_TYPE:
        summary.tracks_msgs += 1
        summary.tracks_linked += int(np.count_nonzero(message.previous_index >= 0))


def process_stereo_bag(input_path, output_path, detector, matcher, *, left_topic=None,
                       right_topic=None, storage=None, prefix=None,
                       max_frame_gap: float = MAX_FRAME_GAP, order: str = "stamp",
                       stereo_params: StereoParams | None = None, sync_tolerance: float = 0.0,
                       overwrite: bool = False, progress: bool = False, log=None,
                       tracks=None, detector_name=None, matcher_name=None,
                       vins: str | None = None) -> Summary:
    """Every stereo pair of the bag through SuperPoint (both images) and EfficientLoFTR
    (temporal on the left, left-right); BagError for unusable input, no partial output.
    ``vins`` ('fusion' | 'mono', with ``tracks``): <prefix>/feature clouds, camera-1 points
    (fusion) from the right CameraInfo."""
    from tqdm import tqdm

    if detector is None or matcher is None:
        raise ValueError("--stereo needs both the detector and the matcher")
    log, typestore, storage, reader = open_input(input_path, output_path, storage, log)
    try:
        left_topic, right_topic = stereo_topics(reader, left_topic, right_topic)
        (_, left_type, left_conns), (_, right_type, right_conns) = (
            image_connections(reader, left_topic), image_connections(reader, right_topic))
        topics = stereo_output_topics(output_prefix(left_topic, right_topic)
                                      if prefix is None else prefix)
        rig = read_rig(reader, typestore, left_topic, right_topic)
        cameras = (None, None)
        if vins:
            # VINS-Mono reads one camera: the right points would have no encoding.
            # The images are rectified: their cameras are the CameraInfos' P (as in frontend_node).
            cameras = (read_camera(reader, typestore, left_topic, f"--vins {vins}", rectified=True),
                       read_camera(reader, typestore, right_topic, f"--vins {vins} (right camera)",
                                   rectified=True) if vins == "fusion" else None)
        summary = Summary(str(input_path), str(output_path), f"{left_topic} + {right_topic}",
                          left_type, storage)
        processor = StereoFrameProcessor(typestore, topics, detector, matcher, rig,
                                         (stereo_params or StereoParams()).validated(),
                                         max_frame_gap, tracks, log, detector_name,
                                         matcher_name, vins, cameras)
        sync = StereoSync(sync_tolerance)
        side_of = {c.id: "left" for c in left_conns} | {c.id: "right" for c in right_conns}
        with AtomicBagWriter(output_path, storage, overwrite) as writer:
            connections, started = {}, time.perf_counter()
            for frame in tqdm(iter_frames(reader, left_conns + right_conns, order),
                              total=sum(c.msgcount for c in left_conns + right_conns),
                              unit="image", disable=not progress, file=sys.stderr):
                summary.frames += 1
                pair = sync.push(side_of[frame.connection.id], frame.stamp_ns, frame)
                if pair is None:
                    continue
                outputs = processor.process_pair(pair.left.data, pair.right.data,
                                                 (left_type, right_type), summary)
                if outputs is None:
                    continue
                summary.processed += 1
                for out_topic, out_type, message in outputs:
                    if out_topic not in connections:
                        connections[out_topic] = writer.add_connection(out_topic, out_type,
                                                                       typestore)
                    writer.write(connections[out_topic], pair.left.log_ns,
                                 typestore.serialize_cdr(message, out_type))
                    _count(summary, out_type, message)
            summary.seconds = time.perf_counter() - started
            summary.stereo_unpaired = sum(c.dropped for c in sync.counts.values()) \
                + sum(sync.pending.values())
            wanted = [("keypoints", KEYPOINTS_TYPE), ("right_keypoints", KEYPOINTS_TYPE),
                      ("matches", MATCHES_TYPE), ("stereo_matches", STEREO_MATCHES_TYPE)]
            wanted += [("tracks", TRACKS_TYPE)] if tracks is not None else []
            wanted += [("feature", POINT_CLOUD_TYPE)] if vins else []
            for key, out_type in wanted:
                if topics[key] not in connections:
                    writer.add_connection(topics[key], out_type, typestore)
    finally:
        reader.close()
    return summary
