"""frontend_node: detection, temporal matches and tracks of every frame it takes, in one
process (kp_ros/core/frontend.py), so tracks link whatever the load.

Mono (default): subscribes ``image`` (or ``image/compressed``) and ``camera_info``.
Stereo (``stereo: true``): ``left/image_rect``, ``right/image_rect`` (or ``.../compressed``),
``left/camera_info``, ``right/camera_info``, paired by stamp (kp_ros/ros/stereo_input.py).
Publishes what superpoint_node, eloftr_node / lightglue_node and track_node publish, on the
same relative names: ``keypoints``, ``matches``, ``tracks``; stereo adds ``right/keypoints``,
``stereo_matches`` (kp_ros/StereoMatches: disparity, depth) and each track's right position
and depth in Tracks. ``vins_layout`` fusion | mono: ``~/feature`` too, the sensor_msgs/PointCloud
VINS-Fusion / VINS-Mono read (kp_ros/core/vins.py), from the frame's camera_info (stereo:
the rectified P, as image_rect is; fusion adds each track's right point as camera 1).
``~/debug_image``: track trails over the (left) frame. One worker,
keep-latest, every frame processed or counted (dropped / rejected / lost), /diagnostics.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from kp_ros.core import models, params
from kp_ros.core.frontend import FrontEnd, track_trails
from kp_ros.core.geometry import CalibrationGate, CameraInfoCache
from kp_ros.core.pipeline import FeaturePipeline
from kp_ros.core.stereo import STEREO_PARAM_NAMES, StereoParams, rig_from_infos
from kp_ros.core.tracks import TRACK_PARAM_NAMES, TrackBook, TrackParams
from kp_ros.core.visualize import draw_tracks
from kp_ros.msg import Keypoints, Matches, StereoMatches, Tracks
from kp_ros.ros.conversions import (keypoints_to_msg, matches_to_msg, stereo_matches_to_msg,
                                   tracks_to_msg)
from kp_ros.ros.feature_node import FeatureNode
from kp_ros.ros.frame_worker import FrameRejected
from kp_ros.ros.node_base import StartupError, run_node
from kp_ros.ros.qos import output_qos
from kp_ros.ros.stereo_input import StereoInput
from kp_ros.ros.vins_cloud import VinsOutput



class FrontendNode(FeatureNode):
    NODE_NAME = "frontend_node"
    SPECS = params.NODES[NODE_NAME]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        values = self.values
        self.detector, self.matcher = self.cores.values()
        self.stereo = values["stereo"]
        try:
            book = TrackBook(TrackParams.from_values(values))
            stereo = None
            if self.stereo:
                from kp_ros.core.stereo_matching import StereoMatcher
                stereo = StereoMatcher(self.matcher, StereoParams.from_values(values),
                                       link_radius=values["association_radius"])
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.frontend = FrontEnd(FeaturePipeline(self.detector, self.matcher,
                                                 values["max_frame_gap"], stereo), book)
        qos = output_qos()
        self._keypoints_pub = self.create_publisher(Keypoints, "keypoints", qos)
        self._matches_pub = self.create_publisher(Matches, "matches", qos)
        self._tracks_pub = self.create_publisher(Tracks, "tracks", qos)
        if self.stereo:
            self._right_pub = self.create_publisher(Keypoints, "right/keypoints", qos)
            self._stereo_pub = self.create_publisher(StereoMatches, "stereo_matches", qos)
        self._history: deque = deque(maxlen=values["trail_length"])  # for the trails overlay
        # Calibration for 'essential', from the (left) camera_info beside each frame.
        self.calibration = CalibrationGate()
        # Per side, the frames' camera_info (stereo: of the rectified images, as image_rect is).
        self._cameras = {side: CameraInfoCache(rectified=self.stereo) for side in ("left", "right")}
        self._rig_key, self._rig = None, None
        self.counts = {"tracks published": 0, "linked tracks": 0, "new tracks": 0,
                       "linked frames": 0}
        self._vins, layout = None, values["vins_layout"]
        if layout != "none":
            # VINS-Mono's NUM_OF_CAM is 1: its layout has no place for a right observation.
            self._vins = VinsOutput(self, layout, num_cameras=2 if layout == "fusion" and self.stereo else 1,
                                    subscribe=False)

    # --- models ---------------------------------------------------------------------
    def build_cores(self) -> dict:
        values = self.values
        if values["stereo"] and values["matcher"] != "eloftr":
            raise StartupError(f"stereo: true needs matcher: eloftr (the left-right step is "
                               f"EfficientLoFTR's), got matcher: {values['matcher']}")
        cores = {}
        for name in ("superpoint", values["matcher"]):
            entry = models.model(name)
            # The node shares the cores with the camera driver and the rest of the system:
            # small ops single-threaded (kp_ros/core/threads.py), as superpoint_node does.
            extras = {"one_thread_small_ops": True} if entry.kind == "detector" else {}
            cores[entry] = entry.build({**values, "model": values[f"{entry.name}_model"]}, **extras)
        return cores

    def warm_up_step(self):
        detector, matcher = self.detector, self.matcher

        def step(image):
            found = detector.detect(image)
            if self.frontend.sparse:
                return matcher.match_pair(found, found, image.shape[:2])
            return matcher.match_pair(image, image)
        return step

    def describe(self) -> str:
        entry = models.model(self.values["matcher"])
        mode = "stereo" if self.stereo else "mono"
        return (f"front-end ({mode}): SuperPoint {self.detector.model_id} + {entry.title} "
                f"{self.matcher.model_id} + tracks on {self.core.device}, precision "
                f"{self.core.precision.note}")

    def make_input(self):
        if not self.stereo:
            return super().make_input()
        return StereoInput(self, self.on_bundle, self.reject_on_arrival,
                           use_compressed=self.values["use_compressed"],
                           reliability=self.values["reliable_input"],
                           tolerance=self.values["stereo_sync_tolerance"])

    # --- parameters -----------------------------------------------------------------
    def check_params(self, changes: dict) -> None:
        super().check_params(changes)
        merged = {**self.values, **changes}
        TrackParams.from_values(merged)
        StereoParams.from_values(merged)

    def apply_node_params(self, changes: dict) -> None:
        pipeline = self.frontend.pipeline
        if "max_frame_gap" in changes:
            pipeline.max_frame_gap = changes["max_frame_gap"]
        if any(name in changes for name in TRACK_PARAM_NAMES):
            self.frontend.book.set_params(TrackParams.from_values(self.values))
        if pipeline.stereo is not None:
            if any(name in changes for name in STEREO_PARAM_NAMES):
                pipeline.stereo.params = StereoParams.from_values(self.values)
            pipeline.stereo.link_radius = float(self.values["association_radius"])
        if self._history.maxlen != self.values["trail_length"]:
            self._history = deque(self._history, maxlen=self.values["trail_length"])

    # --- frames ---------------------------------------------------------------------
    def on_arrival(self, bundle):
        return self.frontend.arrive(bundle.stamp_ns)

    def _camera_of(self, side: str, info):
        """The CameraModel of a frame's camera_info (the side's newest when the frame has
        none), judged once per calibration; None when unusable."""
        cache = self._cameras[side]
        if info is not None and cache.update(info) and cache.problem is not None:
            self.get_logger().error(f"{side} camera_info ignored: {cache.problem}")
        return cache.camera

    def _calibrate(self, info, width: int, height: int) -> None:
        """The camera for 'essential' from the frame's (left) camera_info, used only for
        frames of its size."""
        self.calibration.camera = self._camera_of("left", info)
        self.matcher.camera, refused = self.calibration.for_image(width, height)
        if refused and self.matcher.params.geometric_verification == "essential":
            self.get_logger().warning(refused)

    def _rig_of(self, infos):
        """The stereo rig of the pair's two CameraInfos (recomputed when their P changes)."""
        key = tuple(None if info is None else bytes(np.asarray(info.p, np.float64).tobytes())
                    for info in infos)
        if key != self._rig_key:
            self._rig_key, self._rig = key, rig_from_infos(*infos)
        return self._rig

    def process(self, bundle, images) -> None:
        msg, image = bundle.msgs[0], images[0]
        height, width = image.shape[:2]
        self._calibrate(bundle.infos[0], width, height)
        right = rig = None
        if self.stereo:
            right, rig = images[1], self._rig_of(bundle.infos)
        encoding = getattr(msg, "encoding", None) or getattr(msg, "format", "")
        try:
            result = self.frontend.step(image, bundle.stamp_ns, encoding, token=msg.header,
                                        arrival=bundle.arrival, right=right, rig=rig)
        except ValueError as exc:  # the input cannot be processed; the stream restarted
            raise FrameRejected(str(exc)) from exc
        if result.match.reset:
            self.get_logger().warning(f"stream reset, new tracks at this frame: {result.match.reset}")
        if result.stereo is not None and result.stereo.warning:
            self.get_logger().warning(f"stereo: {result.stereo.warning}")
        self.publish_result(bundle, images, result, rig)

    def publish_result(self, bundle, images, result, rig) -> None:
        msg, image = bundle.msgs[0], images[0]
        header, (height, width) = msg.header, image.shape[:2]
        found = result.detection
        self._keypoints_pub.publish(keypoints_to_msg(header, height, width, self.detector.model_id,
                                                     found.keypoints, found.scores, found.descriptors))
        if result.detection_right is not None:
            right_msg, right = bundle.msgs[1], images[1]
            found = result.detection_right
            self._right_pub.publish(keypoints_to_msg(
                right_msg.header, right.shape[0], right.shape[1], self.detector.model_id,
                found.keypoints, found.scores, found.descriptors))
        if result.match.matches is not None:
            matched, header0 = result.match.matches, result.match.previous
            self._matches_pub.publish(matches_to_msg(
                header, header0.stamp, header0.frame_id, height, width, self.matcher.model_id,
                matched["keypoints0"], matched["keypoints1"], matched["scores"],
                matched["inliers"], matched.get("index0"), matched.get("index1")))
        if result.stereo is not None:
            right_msg = bundle.msgs[1]
            self._stereo_pub.publish(stereo_matches_to_msg(
                header, right_msg.header.stamp, right_msg.header.frame_id, height, width,
                self.matcher.model_id, result.stereo.matches, rig))
        tracks = result.tracks
        tracks.payload = None
        self._tracks_pub.publish(tracks_to_msg(header, height, width, tracks,
                                               result.keypoints_right, result.depth))
        linked = result.linked
        self.counts["tracks published"] += 1
        self.counts["linked tracks"] += linked
        self.counts["new tracks"] += len(tracks.ids) - linked
        self.counts["linked frames"] += int(linked > 0)
        if self._vins is not None:
            self._publish_vins(bundle, result, header, width, height)
        self._history.append(tracks)
        if self.debug_wanted():
            trails = track_trails(self._history, tracks, self._history.maxlen or 1)
            self.publish_debug(draw_tracks(image, trails, tracks.ids), header)

    def _publish_vins(self, bundle, result, header, width: int, height: int) -> None:
        """``~/feature`` for this frame's tracks (VinsOutput counts why not, when it cannot)."""
        cameras = [self._camera_of(side, info) for side, info in zip(("left", "right"), bundle.infos)]
        right = cameras[1] if len(cameras) > 1 else None
        tracks = result.tracks
        self._vins.publish_frame(header, width, height, tracks.ids, tracks.keypoints, cameras[0],
                                 result.keypoints_right, right)

    # --- diagnostics ----------------------------------------------------------------
    def extra_diagnostics(self) -> dict:
        vins = self._vins.values() if self._vins else {}
        return {"stream resets": self.frontend.pipeline.resets, **self.counts, **vins,
                "matcher model": self.matcher.model_id}

    def shutdown(self) -> None:
        super().shutdown()
        self.get_logger().info("tracks: " + ", ".join(f"{k} {v}" for k, v in self.counts.items())
                               + f", stream resets {self.frontend.pipeline.resets}")


def main(args=None) -> int:
    return run_node(FrontendNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
