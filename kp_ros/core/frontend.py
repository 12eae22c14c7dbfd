"""The front-end step: one frame (a mono image, or a rectified stereo pair) in, its
detection, temporal matches, stereo matches and tracks out, all of the same frame.

Built on FeaturePipeline (kp_ros/core/pipeline.py: continuity, resets, the stereo step)
and TrackBook (kp_ros/core/tracks.py). Running the three in one call is what makes tracks
link whatever the load: the matches a frame's tracks are linked through are always those
of this frame and the frame processed before it, both of which have keypoints, so no
step waits for another's message (separate detector / matcher / track processes keep
the latest of *different* frames when they fall behind, and their pairs rarely meet).

- EfficientLoFTR (dense, on the images): tracks linked by association (radius, 'flow').
- LightGlue (sparse, on this frame's keypoints): tracks linked by keypoint index.
- Stereo (``right`` and ``rig`` given, an EfficientLoFTR matcher): SuperPoint on both
  images, the temporal step on the left, the left-right step reusing the left backbone;
  the tracks carry each left keypoint's right position and depth (NaN where none).

ROS-free: frontend_node and process_bag --tracks drive the same object.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kp_ros.core.pipeline import Detection, FeaturePipeline, MatchStep, StereoStep
from kp_ros.core.stereo import StereoRig
from kp_ros.core.tracks import FrameTracks, MatchSet, TrackBook


@dataclass
class FrontendResult:
    """Everything one frame's messages need."""
    stamp_ns: int
    detection: Detection               # left (or the only) image's keypoints
    match: MatchStep                   # temporal matches with the previous processed frame
    tracks: FrameTracks                # this frame's tracks (stereo: with right position, depth)
    matches: MatchSet | None = None    # the temporal matches as the track book took them
    previous_stamp_ns: int | None = None  # the older frame of ``match``, when matched
    detection_right: Detection | None = None  # stereo: the right image's keypoints
    stereo: StereoStep | None = None   # stereo: left-right matches, per-keypoint right / depth

    @property
    def keypoints_right(self) -> np.ndarray | None:
        return None if self.stereo is None else self.stereo.keypoints_right

    @property
    def depth(self) -> np.ndarray | None:
        return None if self.stereo is None else self.stereo.depth

    @property
    def linked(self) -> int:
        return int(np.count_nonzero(self.tracks.previous_index >= 0))


class FrontEnd:
    """``step`` per frame. Not thread-safe: one caller (a node's worker, a bag loop)."""

    def __init__(self, pipeline: FeaturePipeline, book: TrackBook | None = None):
        if pipeline.detector is None or pipeline.matcher is None:
            raise ValueError("the front-end needs both the detector and the matcher")
        self.pipeline = pipeline
        self.book = book or TrackBook()
        self.sparse = bool(getattr(pipeline.matcher, "sparse", False))

    @property
    def stereo(self) -> bool:
        return self.pipeline.stereo is not None

    def arrive(self, stamp_ns: int):
        """Judge a frame's stamp as it arrives (every frame, dropped ones too); pass what
        this returns to ``step`` (kp_ros/core/pipeline.py)."""
        return self.pipeline.arrive(stamp_ns)

    def restart(self) -> None:
        """Forget the previous frame: the next one starts new tracks."""
        self.pipeline.restart()
        self.book.reset()

    def step(self, image: np.ndarray, stamp_ns: int, encoding: str = "", token=None,
             arrival=None, overlay: bool = False, right: np.ndarray | None = None,
             rig=None, payload=None) -> FrontendResult:
        """Detect, match with the previous frame, (stereo) match left-right, and add the
        frame's tracks. ``token`` comes back as ``match.previous`` with the next frame's
        matches; ``overlay`` draws the detection and match overlays. ValueError (bad
        input) or a model failure restarts the stream; the frame then adds no tracks."""
        if (right is None) == self.stereo:
            raise ValueError("a stereo front-end takes left + right images and the rig; "
                             "a mono one takes one image" if self.stereo else
                             "this front-end has no stereo step: build its pipeline with stereo")
        pipeline, detection_right = self.pipeline, None
        if right is None:
            detection = pipeline.detect(image, overlay=overlay)
        else:
            detection, detection_right = pipeline.detect_stereo(image, right, overlay=overlay)
        # The pipeline hands back the previous frame's token: carry its stamp in it too.
        if self.sparse:
            features = {"keypoints": detection.keypoints, "scores": detection.scores,
                        "descriptors": detection.descriptors}
            match = pipeline.match_keypoints(features, image.shape[:2], stamp_ns,
                                             token=(stamp_ns, token), arrival=arrival,
                                             image=image if overlay else None)
        else:
            match = pipeline.match(image, stamp_ns, encoding, token=(stamp_ns, token),
                                   arrival=arrival, overlay=overlay)
        previous_stamp = None
        matches = None
        if match.matches is not None:
            previous_stamp, match.previous = match.previous
            found = match.matches
            inliers = found["inliers"] if len(found["inliers"]) else None
            matches = MatchSet(stamp_ns, previous_stamp, found["keypoints0"], found["keypoints1"],
                               found["scores"], inliers, found.get("index0"), found.get("index1"))
        stereo = None
        if right is not None:
            if rig is None:
                rig = StereoRig(problem="no camera_info for the pair yet: no depth")
            stereo = pipeline.match_stereo(image, right, rig, detection.keypoints,
                                           detection_right.keypoints, overlay=overlay)
        tracks = self.book.add(stamp_ns, detection.keypoints, matches, why_new=match.reset,
                               payload=payload)
        return FrontendResult(stamp_ns, detection, match, tracks, matches, previous_stamp,
                              detection_right, stereo)


def track_trails(history, newest: FrameTracks, length: int) -> np.ndarray:
    """(N, length, 2) positions of ``newest``'s tracks, newest first, NaN before a track
    began or beyond the frames in ``history`` (FrameTracks, any order)."""
    by_stamp = {f.stamp_ns: f for f in history}
    length = max(int(length), 1)
    trails = np.full((len(newest.ids), length, 2), np.nan, np.float32)
    trails[:, 0] = newest.keypoints
    rows, index, frame = np.arange(len(newest.ids)), newest.previous_index.astype(np.int64), newest
    for step in range(1, length):
        older = by_stamp.get(frame.linked_from_ns) if frame.linked_from_ns is not None else None
        keep = index >= 0
        if older is None or not keep.any():
            break
        rows, index = rows[keep], index[keep]
        trails[rows, step] = older.keypoints[index]
        frame, index = older, older.previous_index[index].astype(np.int64)
    return trails
