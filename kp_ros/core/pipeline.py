"""FeaturePipeline: one frame (image + stamp + encoding) in, numpy results and reset reasons out.

The one place where stream continuity, pairing with the previous frame, the reset after a
failure and the debug overlays are decided; superpoint_node, eloftr_node and process_bag
call it and keep only their edges (subscription or bag reader, publisher or bag writer).

Stamps are judged on *arrival* (``arrive``, every frame: a slow device that drops frames
still matches the ones it gets to), size / encoding / order on *processing* (``match``);
an arrival break starts a new epoch and the first processed frame of it resets the matcher.
Where every frame that arrives is processed (a bag), ``match`` does both.

Stereo (a ``stereo`` StereoMatcher given): ``detect_stereo`` runs SuperPoint on both images
of a pair, ``match`` the temporal step on the left image as in mono, then ``match_stereo``
the left-right step, reusing the left image's backbone features from ``match``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kp_ros.core.params import spec
from kp_ros.core.stream_continuity import FrameInfo, StreamContinuity


@dataclass
class Detection:
    keypoints: np.ndarray    # (N, 2) float32 source pixels
    scores: np.ndarray       # (N,)
    descriptors: np.ndarray  # (N, D)
    overlay: np.ndarray | None = None  # RGB debug image, when asked for


@dataclass
class MatchStep:
    """What one frame gave the matcher: matches with the previous frame, or why none."""
    matches: dict[str, np.ndarray] | None  # keypoints0, keypoints1, scores, inliers (empty: unverified)
    previous: object = None   # the older frame's token (e.g. its header), when matches
    reset: str | None = None  # why the stream restarted at this frame
    overlay: np.ndarray | None = None  # RGB debug image, when asked for and matched


@dataclass
class StereoStep:
    """What one stereo pair gave: checked left-right matches, and per left keypoint its
    right keypoint and depth (NaN where none)."""
    matches: object                 # kp_ros.core.stereo.StereoMatchSet
    keypoints_right: np.ndarray | None = None  # (N, 2) per left keypoint, NaN: no right match
    depth: np.ndarray | None = None  # (N,) per left keypoint, NaN where none
    warning: str | None = None       # a new reason for no depth (unrectified), said once
    overlay: np.ndarray | None = None


class FeaturePipeline:
    """``detect`` (SuperPoint) and ``match`` (EfficientLoFTR against the previous frame);
    either model may be None. Not thread-safe: one caller (a node's worker, a bag loop)."""

    def __init__(self, detector=None, matcher=None,
                 max_frame_gap: float = spec("eloftr_node", "max_frame_gap").default,
                 stereo=None):
        self.detector, self.matcher = detector, matcher
        self.stereo = stereo  # kp_ros.core.stereo_matching.StereoMatcher, or None (mono)
        self._pushed = None  # the image the matcher's latest backbone features are of
        self._stereo_problem: str | None = None  # the last one reported
        self._arrivals = StreamContinuity(max_frame_gap)
        self._epoch: tuple[int, str | None] = (0, None)  # (number, why it began) of arriving frames
        self._processed = StreamContinuity(max_frame_gap=0)  # size, encoding, stamp order
        self._processed_epoch = 0
        self._previous = None  # (token, image) of the last frame the matcher finished
        self.resets = 0
        if matcher is not None:
            matcher.reset()

    @property
    def max_frame_gap(self) -> float:
        return self._arrivals.max_frame_gap

    @max_frame_gap.setter
    def max_frame_gap(self, seconds: float) -> None:
        self._arrivals.max_frame_gap = seconds

    def arrive(self, stamp_ns: int) -> tuple[int, str | None]:
        """Judge a frame's stamp as it arrives; pass what this returns to ``match``."""
        broken = self._arrivals.check(FrameInfo(stamp_ns, 0, 0, ""))
        if broken:
            self._epoch = (self._epoch[0] + 1, broken)
        return self._epoch

    def detect(self, image: np.ndarray, overlay: bool = False) -> Detection:
        features = self.detector.detect(image)  # numpy, as every core result
        found = Detection(features["keypoints"], features["scores"], features["descriptors"])
        if overlay:
            from kp_ros.core.visualize import draw_keypoints
            found.overlay = draw_keypoints(image, found.keypoints, found.scores)
        return found

    def match(self, image: np.ndarray, stamp_ns: int, encoding: str, token=None,
              arrival: tuple[int, str | None] | None = None, overlay: bool = False) -> MatchStep:
        """Match ``image`` with the previous processed frame. ``token`` comes back as
        ``previous`` with the next frame's matches. An exception from the matcher restarts
        the stream (re-raised), so a later pair never spans a frame it did not finish."""
        return self._step(lambda: self.matcher.push(image), image.shape[:2], stamp_ns, encoding,
                          token, arrival, image, overlay)

    def match_keypoints(self, features: dict, image_size: tuple[int, int], stamp_ns: int,
                        token=None, arrival: tuple[int, str | None] | None = None,
                        image: np.ndarray | None = None) -> MatchStep:
        """``match`` for a sparse matcher (LightGlue): the frame is its detector output
        (keypoints, scores, descriptors) and its image size (H, W); ``image``, when given,
        is drawn on (with the previous frame's, when that had one)."""
        return self._step(lambda: self.matcher.push(features["keypoints"], features["scores"],
                                                    features["descriptors"], image_size),
                          image_size, stamp_ns, "keypoints", token, arrival, image,
                          image is not None)

    def _step(self, push, size, stamp_ns, encoding, token, arrival, image, overlay) -> MatchStep:
        if arrival is None:
            arrival = self.arrive(stamp_ns)
        height, width = size
        epoch, why = arrival
        broken = None
        if epoch != self._processed_epoch:
            self._processed_epoch = epoch
            self._processed.reset()
            broken = why if self._previous is not None else None
        broken = self._processed.check(FrameInfo(stamp_ns, height, width, encoding)) or broken
        if broken:
            self.resets += 1
            self.matcher.reset()
        try:
            matches = push()
        except BaseException:
            self.restart()
            raise
        self._pushed = image
        previous, self._previous = self._previous, (token, image)
        if matches is None:
            return MatchStep(None, reset=broken)
        step = MatchStep(matches, previous[0], broken)
        if overlay and image is not None and previous[1] is not None:
            from kp_ros.core.visualize import draw_matches
            inliers = matches["inliers"].astype(bool) if len(matches["inliers"]) else None
            step.overlay = draw_matches(previous[1], image, matches["keypoints0"], matches["keypoints1"],
                                        matches["scores"], inliers)
        return step

    def restart(self) -> None:
        """Forget the previous frame (matcher and continuity): the next frame starts a pair."""
        if self.matcher is not None:
            self.matcher.reset()
        self._processed.reset()
        self._previous = None
        self._pushed = None

    def detect_stereo(self, left: np.ndarray, right: np.ndarray,
                      overlay: bool = False) -> tuple[Detection, Detection]:
        """SuperPoint on both images of a pair (one batched forward when they have one size)."""
        from kp_ros.core.stereo_matching import detect_pair
        found = [Detection(f["keypoints"], f["scores"], f["descriptors"])
                 for f in detect_pair(self.detector, left, right)]
        if overlay:
            from kp_ros.core.visualize import draw_keypoints
            found[0].overlay = draw_keypoints(left, found[0].keypoints, found[0].scores)
        return found[0], found[1]

    def match_stereo(self, left: np.ndarray, right: np.ndarray, rig,
                     keypoints_left=None, keypoints_right=None,
                     overlay: bool = False) -> StereoStep:
        """Left-right matches of a pair, checked against the rig (kp_ros.core.stereo.StereoRig);
        after ``match(left, ...)`` its backbone features are reused. With both images'
        keypoints, also each left keypoint's right keypoint and depth."""
        from kp_ros.core.stereo import link_keypoints
        features = self.matcher.latest_features if left is self._pushed else None
        found = self.stereo.match(left, right, rig, features)
        step = StereoStep(found)
        if found.problem != self._stereo_problem:
            self._stereo_problem = found.problem
            step.warning = found.problem
        if keypoints_left is not None and keypoints_right is not None:
            step.keypoints_right, step.depth = link_keypoints(
                keypoints_left, keypoints_right, found, self.stereo.link_radius, rig,
                self.stereo.params)
        if overlay:
            from kp_ros.core.visualize import draw_matches
            step.overlay = draw_matches(left, right, found.left, found.right, found.scores, None)
        return step
