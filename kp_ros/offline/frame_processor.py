"""process_bag's frame step: one serialized image in, its output messages out (through
kp_ros/core/pipeline.py, as in the nodes; with tracks through kp_ros/core/frontend.py, as
frontend_node runs it); and the camera calibration the matcher's essential-matrix
verification takes from the bag's CameraInfo."""
from __future__ import annotations

from kp_ros.core.geometry import CalibrationGate
from kp_ros.core.pipeline import FeaturePipeline
from kp_ros.core.stamps import stamp_problem
from kp_ros.bags.messages import (IMAGE_TYPE, KEYPOINTS_TYPE, MATCHES_TYPE, TRACKS_TYPE,
                                  image_msg, keypoints_msg, matches_msg, stamp_to_ns,
                                  tracks_msg)
from kp_ros.bags.reader import decode_image_msg, image_encoding, read_messages
from kp_ros.core.topics import camera_info_topic
from kp_ros.offline.options import MAX_FRAME_GAP
from kp_ros.offline.summary import Summary


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
        if tracks is not None and (detector is None or matcher is None):
            raise ValueError("tracks need both the detector and the matcher")
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
            return outputs + [self._tracks_output(msg, image, result)]
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
        self.frontend = None
        if tracks is not None:
            self.frontend = FrontEnd(self.pipeline, TrackBook(tracks))
        self.book = None if self.frontend is None else self.frontend.book

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

    def _tracks_output(self, msg, image, result) -> tuple:
        height, width = image.shape[:2]
        return (self.topics["tracks"], TRACKS_TYPE, tracks_msg(
            self.typestore, msg.header, height, width, result.tracks, result.keypoints_right,
            result.depth))

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
