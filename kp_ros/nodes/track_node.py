"""track_node: persistent feature tracks from SuperPoint Keypoints and EfficientLoFTR Matches.

Subscribes ``keypoints`` (kp_ros/Keypoints) and ``matches`` (kp_ros/Matches), publishes
``tracks`` (kp_ros/Tracks, one per Keypoints frame, in stamp order), with ``vins_layout``
set ``~/feature`` (sensor_msgs/PointCloud for VINS-Fusion / VINS-Mono, from ``camera_info``;
kp_ros/ros/vins_cloud.py) and, when someone
subscribes to it or ``debug_image`` is set, ``~/debug_image`` (track trails coloured by
id over the frame; the node then also subscribes ``image``). A frame is linked to the
older frame its Matches name (header = this frame, stamp0 = the older one); Keypoints
and Matches may arrive in either order; a frame whose Matches never come (a stream
reset in eloftr_node, a dropped frame) gets new tracks after ``match_timeout`` seconds,
or at once when Matches of a newer frame show the matcher moved past it.

All the logic is kp_ros.core.tracks and kp_ros.core.track_sync (pure); this file converts
messages and counts.
"""
from __future__ import annotations

import functools
import time
import traceback
from collections import deque

import numpy as np
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from kp_ros.core import params
from kp_ros.core.image_codec import ImageDecodeError
from kp_ros.core.stamps import stamp_problem
from kp_ros.core.frontend import track_trails
from kp_ros.core.track_sync import TrackSynchronizer
from kp_ros.core.tracks import FrameTracks, MatchSet, TrackBook, TrackParams
from kp_ros.core.visualize import draw_tracks
from kp_ros.msg import Keypoints, Matches, Tracks
from kp_ros.ros.conversions import (image_msg_to_model_input, keypoint_positions, matches_from_msg,
                                   stamp_ns, tracks_to_msg)
from kp_ros.ros.diagnostics import latency_values
from kp_ros.ros.node_base import NodeBase, StartupError, run_node
from kp_ros.ros.qos import image_input_qos, output_qos
from kp_ros.ros.vins_cloud import VinsOutput

# Inputs are small and each one matters (a lost Matches costs a frame its links):
# reliable, with room for a burst while the executor is busy.
INPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE)
IMAGES_KEPT = 8  # frames kept for the debug overlay, waiting for their tracks



def _guarded(handler):
    """A callback that logs (with the traceback) and counts an exception instead of letting
    it end the executor's spin: one bad message must not stop the node."""
    @functools.wraps(handler)
    def callback(self, *args):
        try:
            return handler(self, *args)
        except Exception:  # noqa: BLE001 - counted and logged with its traceback
            self.counts["errors"] += 1
            self.log_rejected(f"{handler.__name__} failed (errors so far: "
                              f"{self.counts['errors']}):\n{traceback.format_exc()}")
    return callback


class TrackNode(NodeBase):
    NODE_NAME = "track_node"
    SPECS = params.NODES[NODE_NAME]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        try:
            book = TrackBook(TrackParams.from_values(self.values))
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.sync = TrackSynchronizer(book, timeout=self.values["match_timeout"],
                                      max_pending=self.values["max_pending"])
        self._pub = self.create_publisher(Tracks, "tracks", output_qos())
        self._vins = None if self.values["vins_layout"] == "none" else VinsOutput(self, self.values["vins_layout"])
        self._kp_sub = self._match_sub = None  # start() subscribes
        self._image_sub = None  # created while the debug image is wanted
        self._images: dict[int, Image] = {}
        self._history: deque[FrameTracks] = deque(maxlen=self.values["trail_length"])
        self.counts = {"keypoints": 0, "matches": 0, "published": 0, "rejected": 0,
                       "linked tracks": 0, "new tracks": 0, "size mismatch": 0, "errors": 0}
        self._latencies: deque[float] = deque(maxlen=200)
        self._diag_prev = (time.monotonic(), 0)
        self._last_warn_log = 0.0

    def start(self) -> None:
        """Subscribe and start the timers once the node is fully built (run_node calls it)."""
        if self._kp_sub is not None:
            return
        self._kp_sub = self.create_subscription(Keypoints, "keypoints", self.on_keypoints, INPUT_QOS)
        self._match_sub = self.create_subscription(Matches, "matches", self.on_matches, INPUT_QOS)
        self.create_timer(0.05, self._poll)  # timeouts are judged to within 50 ms
        self.create_timer(self.values["diagnostics_period"], self._publish_diagnostics)

    def announce(self) -> None:
        self.get_logger().info(
            f"tracks from {self._kp_sub.topic_name} + {self._match_sub.topic_name} "
            f"on {self._pub.topic_name} ({self.values['association']} association, "
            f"radius {self.values['association_radius']} px)")

    # --- parameters -----------------------------------------------------------------
    def check_params(self, changes: dict) -> None:
        TrackParams.from_values({**self.values, **changes})  # ValueError: rejected

    def apply_params(self, changes: dict) -> None:
        self.sync.book.set_params(TrackParams.from_values(self.values))
        self.sync.timeout = self.values["match_timeout"]
        if self._history.maxlen != self.values["trail_length"]:
            self._history = deque(self._history, maxlen=self.values["trail_length"])

    # --- inputs ---------------------------------------------------------------------
    @_guarded
    def on_keypoints(self, msg: Keypoints) -> None:
        started = time.perf_counter()
        self.counts["keypoints"] += 1
        if len(msg.x) != len(msg.y):
            return self._reject(f"Keypoints with {len(msg.x)} x but {len(msg.y)} y")
        problem = stamp_problem(msg.header.stamp)
        if problem is not None:
            return self._reject(f"Keypoints with a {problem}")
        ready = self.sync.add_keypoints(stamp_ns(msg.header.stamp), keypoint_positions(msg),
                                        time.monotonic(), payload=msg, size=(msg.width, msg.height))
        self._publish(ready, started)

    @_guarded
    def on_matches(self, msg: Matches) -> None:
        started = time.perf_counter()
        self.counts["matches"] += 1
        problem = stamp_problem(msg.header.stamp) or stamp_problem(msg.stamp0)
        if problem is not None:
            return self._reject(f"Matches with a {problem}")
        n = len(msg.scores)
        if not (len(msg.x0) == len(msg.y0) == len(msg.x1) == len(msg.y1) == n) \
                or len(msg.inliers) not in (0, n) or len(msg.index0) != len(msg.index1) \
                or len(msg.index0) not in (0, n):
            return self._reject(f"Matches with inconsistent lengths (x0 {len(msg.x0)}, y0 {len(msg.y0)}, "
                                f"x1 {len(msg.x1)}, y1 {len(msg.y1)}, scores {n}, "
                                f"inliers {len(msg.inliers)}, index0 {len(msg.index0)}, "
                                f"index1 {len(msg.index1)})")
        fields = matches_from_msg(msg)
        matches = MatchSet(stamp_ns(msg.header.stamp), stamp_ns(msg.stamp0), fields["keypoints0"],
                           fields["keypoints1"], fields["scores"],
                           fields["inliers"] if len(fields["inliers"]) else None,
                           *((fields["index0"], fields["index1"]) if len(fields["index0"]) else ()))
        if matches.stamp0_ns >= matches.stamp_ns:
            return self._reject("Matches whose older frame (stamp0) is not older than its header stamp")
        self._publish(self.sync.add_matches(matches, time.monotonic(), size=(msg.width, msg.height)),
                      started)

    @_guarded
    def on_image(self, msg: Image) -> None:
        problem = stamp_problem(msg.header.stamp)
        if problem is not None:
            return self._reject(f"debug image: {problem}")
        self._images[stamp_ns(msg.header.stamp)] = msg
        while len(self._images) > IMAGES_KEPT:
            del self._images[min(self._images)]

    @_guarded
    def _poll(self) -> None:
        self._publish(self.sync.poll(time.monotonic()), time.perf_counter())
        self._update_image_subscription()

    def _reject(self, reason: str) -> None:
        self.counts["rejected"] += 1
        self.log_rejected(f"input rejected: {reason} (rejected so far: {self.counts['rejected']})")

    # --- outputs --------------------------------------------------------------------
    def _publish(self, ready: list[FrameTracks], started: float) -> None:
        mismatches = self.sync.counters["size mismatch"]
        if mismatches > self.counts["size mismatch"]:
            self.counts["size mismatch"] = mismatches
            now = time.monotonic()
            if now - self._last_warn_log >= 1.0:  # throttled, as rejects are
                self._last_warn_log = now
                why = next((t.why_new for t in ready if t.why_new and "image, keypoints" in t.why_new), "")
                self.get_logger().warning(f"Matches for another image size than the Keypoints' "
                                          f"refused ({why}): new tracks (so far: {mismatches})")
        for tracks in ready:
            keypoints_msg = tracks.payload
            tracks.payload = None  # the history keeps arrays, not messages
            msg = tracks_to_msg(keypoints_msg.header, keypoints_msg.height, keypoints_msg.width, tracks)
            self._pub.publish(msg)
            if self._vins is not None:
                self._vins.publish(msg, tracks.keypoints)
            self.counts["published"] += 1
            linked = int((tracks.previous_index >= 0).sum())
            self.counts["linked tracks"] += linked
            self.counts["new tracks"] += len(tracks.ids) - linked
            self._latencies.append(time.perf_counter() - started)
            self._history.append(tracks)
            if self.debug_wanted():
                self._publish_debug(keypoints_msg.header, tracks)

    def _update_image_subscription(self) -> None:
        wanted = self.debug_wanted()
        if wanted and self._image_sub is None:
            self._image_sub = self.create_subscription(Image, "image", self.on_image, image_input_qos(False))
        elif not wanted and self._image_sub is not None:
            self.destroy_subscription(self._image_sub)
            self._image_sub = None
            self._images.clear()

    def trails(self, newest: FrameTracks) -> np.ndarray:
        """(N, L, 2) positions of the newest frame's tracks, newest first, NaN before a
        track began (or beyond the remembered frames)."""
        return track_trails(self._history, newest, self._history.maxlen or 1)

    def _publish_debug(self, header, tracks: FrameTracks) -> None:
        image_msg = self._images.get(tracks.stamp_ns)
        if image_msg is None:
            return  # its image has not arrived (or was lost): nothing to draw on
        try:
            image = image_msg_to_model_input(image_msg)
        except ImageDecodeError as exc:
            return self._reject(f"debug image: {exc}")
        self.publish_debug(draw_tracks(image, self.trails(tracks), tracks.ids), header)

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        then, published0 = self._diag_prev
        self._diag_prev = (now, self.counts["published"])
        warning = f"{self.counts['rejected']} inputs rejected" if self.counts["rejected"] else None
        values = {
            "published rate (Hz)": (self.counts["published"] - published0) / max(now - then, 1e-6),
            **self.counts, **dict(self.sync.counters),
            **{f"book {k}": v for k, v in self.sync.book.counters.items()},
            "pending": self.sync.pending,
            **(self._vins.values() if self._vins is not None else {}),
            **latency_values(self._latencies),
        }
        self.publish_diagnostics("feature tracks", "cpu", values, warning)

    def summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in {**self.counts, **self.sync.counters}.items())

    def shutdown(self) -> None:
        """Publish what is still waiting (as new tracks: its Matches will not come), log counters."""
        self._publish(self.sync.flush("node shutting down"), time.perf_counter())
        self.get_logger().info(f"shutting down: {self.summary()}")


def main(args=None) -> int:
    return run_node(TrackNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
