"""process_bag's frame step: one serialized image in, its output messages out (through
kp_ros/core/pipeline.py, as in the nodes; with tracks through kp_ros/core/frontend.py, as
frontend_node runs it); the camera calibration the matcher's essential-matrix verification
and the VINS feature cloud take from the bag's CameraInfo; and the set-up every bag run
starts with (``open_input``)."""
from __future__ import annotations

import sys

from kp_ros.core.geometry import CalibrationGate, CameraModel
from kp_ros.core.pipeline import FeaturePipeline
from kp_ros.core.stamps import stamp_problem
from kp_ros.bags.messages import (IMAGE_TYPE, KEYPOINTS_TYPE, MATCHES_TYPE, POINT_CLOUD_TYPE,
                                  TRACKS_TYPE, image_msg, keypoints_msg, kp_ros_typestore,
                                  matches_msg, point_cloud_msg, stamp_to_ns, tracks_msg)
from kp_ros.bags.reader import (BagError, decode_image_msg, detect_storage, image_encoding,
                                open_bag, read_messages)
from kp_ros.bags.writer import check_output_apart
from kp_ros.core.topics import camera_info_topic
from kp_ros.offline.options import MAX_FRAME_GAP
from kp_ros.offline.summary import Summary

CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"


def open_input(input_path, output_path, storage: str | None, log):
    """(log, typestore, storage, reader): the output checked apart from the input, the
    output storage (default: the input's), the input opened; ``log`` defaults to tqdm's."""
    if log is None:
        from tqdm import tqdm

        def log(text):
            tqdm.write(text, file=sys.stderr)
    check_output_apart(input_path, output_path)
    typestore = kp_ros_typestore()
    storage = storage or detect_storage(input_path)
    return log, typestore, storage, open_bag(input_path)


def first_camera_info(reader, typestore, image_topic: str):
    """The first sensor_msgs/CameraInfo beside ``image_topic`` (its camera_info sibling),
    or None when the bag has none there."""
    topic = camera_info_topic(image_topic)
    connections = [c for c in reader.connections if c.topic == topic and c.msgtype == CAMERA_INFO_TYPE]
    # An empty connection list would make the reader return every topic.
    for _, _, data in read_messages(reader, connections) if connections else ():
        return typestore.deserialize_cdr(data, CAMERA_INFO_TYPE)
    return None


def read_camera(reader, typestore, image_topic: str, why: str, rectified: bool = False) -> CameraModel:
    """The calibration of the first CameraInfo beside ``image_topic`` (taken as fixed for
    the bag; ``rectified``: of its rectified image, see camera_of_info); BagError saying
    ``why`` it is needed when it is missing or unusable."""
    from kp_ros.core.geometry import camera_of_info
    info = first_camera_info(reader, typestore, image_topic)
    topic = camera_info_topic(image_topic)
    if info is None:
        raise BagError(f"{why} needs a {CAMERA_INFO_TYPE} on {topic} (beside {image_topic}); "
                       f"the bag has none there")
    try:
        return camera_of_info(info, rectified)
    except ValueError as err:
        raise BagError(f"{why}: {topic}: {err}") from None


class FrameProcessor:
    """One frame in, its output messages out: decode -> detect -> continuity -> match.

    A frame either yields all its outputs or is rejected (with the reason) and yields
    none; a failure inside the matcher also restarts the stream, so the next Matches
    never pairs with a frame the matcher did not finish.
    """

    def __init__(self, typestore, topics: dict, detector=None, matcher=None,
                 max_frame_gap: float = MAX_FRAME_GAP, debug_images: bool = False,
                 detector_name: str | None = None, matcher_name: str | None = None,
                 tracks=None, vins: str | None = None, cameras: tuple = (None, None)):
        self.typestore, self.topics = typestore, topics
        if tracks is not None and (detector is None or matcher is None):
            raise ValueError("tracks need both the detector and the matcher")
        # --vins: the feature cloud of every Tracks; ``cameras`` (left, right CameraModel).
        self.vins, self.cameras = None, cameras
        if vins is not None:
            from kp_ros.core.vins import VinsFeatures
            if tracks is None:
                raise ValueError("the VINS feature cloud needs tracks")
            # VINS-Mono's NUM_OF_CAM is a constant 1 (as in track_node).
            self.vins = VinsFeatures(vins, num_cameras=2 if vins == "fusion" else 1)
        self._frame_features = None
        # A sparse matcher (LightGlue) matches the detector's output of the same frame.
        self.sparse = bool(getattr(matcher, "sparse", False))
        if self.sparse and detector is None:
            raise ValueError("a sparse matcher needs the detector: it matches its keypoints")
        self.detector, self.matcher = detector, matcher
        self.detector_name = detector_name or (detector.model_id if detector else "")
        self.matcher_name = matcher_name or (matcher.model_id if matcher else "")
        # Continuity, pairing, resets and overlays: kp_ros/core/pipeline.py, as in the nodes.
        self.pipeline = FeaturePipeline(detector, matcher, max_frame_gap)
        self._use_frontend(tracks)
        # The bag's calibration (use_camera_info), used only for frames of its size.
        self.calibration = CalibrationGate()
        self.calibration.camera = getattr(matcher, "camera", None)
        self.debug_images = debug_images

    def process(self, data, msgtype: str, summary: Summary) -> list[tuple[str, str, object]] | None:
        """[(topic, msgtype, message)] for one serialized frame, or None if rejected."""
        try:
            msg = self.typestore.deserialize_cdr(data, msgtype)
        except Exception as err:  # noqa: BLE001 - any garbage in a message is that frame's problem
            summary.note(summary.rejected, f"undeserializable {msgtype} ({type(err).__name__}: {err})")
            return None
        problem = stamp_problem(msg.header.stamp)
        if problem is not None:
            summary.note(summary.rejected, problem)
            return None
        try:
            image = decode_image_msg(msg, msgtype)
        except ValueError as err:
            summary.note(summary.rejected, f"undecodable image: {err}")
            return None
        if self.frontend is not None:
            stepped = self._frontend_step(msg, msgtype, image, summary)
            if stepped is None:
                return None
            outputs, result = stepped
            return outputs + self._tracks_outputs(msg, image, result, summary)
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
        return outputs

    def _use_frontend(self, tracks) -> None:
        """With tracks (``tracks``: TrackParams) every frame goes through the front-end step
        (kp_ros/core/frontend.py), on this processor's pipeline."""
        from kp_ros.core.frontend import FrontEnd
        from kp_ros.core.tracks import TrackBook
        self.frontend = None if tracks is None else FrontEnd(self.pipeline, TrackBook(tracks))

    def _frontend_step(self, msg, msgtype: str, image, summary: Summary, right=None, rig=None):
        """(Keypoints and Matches outputs, the FrontendResult) of one frame (stereo: its left
        image, with ``right`` and the ``rig``) through the front-end, or None (rejected)."""
        self._calibrate(image, summary)
        try:
            result = self.frontend.step(image, stamp_to_ns(msg.header.stamp),
                                        image_encoding(msg, msgtype), token=msg.header,
                                        overlay=self.debug_images, right=right, rig=rig)
        except ValueError as err:  # a restarted stream, when the matcher's
            summary.note(summary.rejected, f"detector or matcher: {err}")
            return None
        return (self._keypoints_outputs(msg, image, result.detection)
                + self._match_outputs(msg, image, result.match, summary)), result

    def _tracks_outputs(self, msg, image, result, summary: Summary) -> list:
        """The frame's Tracks and, with --vins, its feature cloud."""
        height, width = image.shape[:2]
        return [(self.topics["tracks"], TRACKS_TYPE, tracks_msg(
            self.typestore, msg.header, height, width, result.tracks, result.keypoints_right,
            result.depth))] + self._vins_cloud(msg.header, result.tracks, (width, height), summary,
                                               result.keypoints_right)

    def _vins_cloud(self, header, tracks, size: tuple, summary: Summary, keypoints_right=None) -> list:
        """[(feature topic, PointCloud type, message)] for one Tracks frame, or [] without
        --vins or when the calibration is for another image size (an event of the frame)."""
        if self.vins is None:
            return []
        left, right = self.cameras
        if (left.width, left.height) not in ((0, 0), size):
            # Not scaled: binning, cropping and a driver's resize change K differently.
            summary.vins_skipped += 1
            summary.events.append(("no VINS cloud", f"camera_info is for {left.width}x{left.height} images, "
                                                    f"the frames are {size[0]}x{size[1]}"))
            return []
        cloud = self.vins.frame(tracks.stamp_ns, tracks.ids, tracks.keypoints, left,
                                keypoints_right if right is not None else None, right)
        summary.vins_msgs += 1
        return [(self.topics["feature"], POINT_CLOUD_TYPE, point_cloud_msg(self.typestore, header, cloud))]

    def _detect(self, msg, image) -> list:
        found = self.pipeline.detect(image, overlay=self.debug_images)
        self._frame_features = {"keypoints": found.keypoints, "scores": found.scores,
                                "descriptors": found.descriptors}
        return self._keypoints_outputs(msg, image, found)

    def _keypoints_outputs(self, msg, image, found) -> list:
        height, width = image.shape[:2]
        out = [(self.topics["keypoints"], KEYPOINTS_TYPE, keypoints_msg(
            self.typestore, msg.header, height, width, self.detector_name,
            found.keypoints, found.scores, found.descriptors))]
        if found.overlay is not None:
            out.append((self.topics["keypoints_debug"], IMAGE_TYPE,
                        image_msg(self.typestore, found.overlay, "rgb8", msg.header)))
        return out

    def _calibrate(self, image, summary: Summary) -> None:
        height, width = image.shape[:2]
        self.matcher.camera, refused = self.calibration.for_image(width, height)
        if refused and self.matcher.params.geometric_verification == "essential":
            summary.events.append(("calibration refused", refused))

    def _match(self, msg, msgtype: str, image, summary: Summary) -> list:
        self._calibrate(image, summary)
        stamp_ns = stamp_to_ns(msg.header.stamp)
        if self.sparse:
            step = self.pipeline.match_keypoints(self._frame_features, image.shape[:2], stamp_ns,
                                                 token=msg.header,
                                                 image=image if self.debug_images else None)
        else:
            step = self.pipeline.match(image, stamp_ns, image_encoding(msg, msgtype),
                                       token=msg.header, overlay=self.debug_images)
        return self._match_outputs(msg, image, step, summary)

    def _match_outputs(self, msg, image, step, summary: Summary) -> list:
        if step.reset:
            summary.note(summary.resets, step.reset)
        if step.matches is None:
            return []
        height, width = image.shape[:2]
        found, header0 = step.matches, step.previous
        inliers = found["inliers"] if len(found["inliers"]) else None
        out = [(self.topics["matches"], MATCHES_TYPE, matches_msg(
            self.typestore, msg.header, header0.stamp, header0.frame_id, height, width,
            self.matcher_name, found["keypoints0"], found["keypoints1"], found["scores"], inliers,
            found.get("index0"), found.get("index1")))]
        if step.overlay is not None:
            out.append((self.topics["matches_debug"], IMAGE_TYPE,
                        image_msg(self.typestore, step.overlay, "rgb8", msg.header)))
        return out


def use_camera_info(reader, typestore, matcher, image_topic: str, log) -> None:
    """Give ``matcher`` the calibration of the bag's first CameraInfo beside the image
    topic (intrinsics are taken as fixed for the bag), or say why it runs 'fundamental'."""
    from kp_ros.core.geometry import camera_from_info
    topic = camera_info_topic(image_topic)
    matcher.camera = None
    info = first_camera_info(reader, typestore, image_topic)
    if info is not None:
        try:
            matcher.camera = camera_from_info(info.k, info.d, info.distortion_model, info.width, info.height)
        except ValueError as err:
            log(f"geometric_verification essential: {topic}: {err}; verifying with a fundamental matrix")
        return
    log(f"geometric_verification essential: no sensor_msgs/CameraInfo on {topic} in the bag; "
        f"verifying with a fundamental matrix")
