"""FeaturePipeline: one frame (image + stamp + encoding) in, numpy results and reset reasons out.

The one place where stream continuity, pairing with the previous frame, the reset after a
failure and the debug overlays are decided; superpoint_node, eloftr_node and process_bag
call it and keep only their edges (subscription or bag reader, publisher or bag writer).

Stamps are judged on *arrival* (``arrive``, every frame: a slow device that drops frames
still matches the ones it gets to), size / encoding / order on *processing* (``match``);
an arrival break starts a new epoch and the first processed frame of it resets the matcher.
Where every frame that arrives is processed (a bag), ``match`` does both.
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


class FeaturePipeline:
    """``detect`` (SuperPoint) and ``match`` (EfficientLoFTR against the previous frame);
    either model may be None. Not thread-safe: one caller (a node's worker, a bag loop)."""

    def __init__(self, detector=None, matcher=None,
                 max_frame_gap: float = spec("eloftr_node", "max_frame_gap").default):
        self.detector, self.matcher = detector, matcher
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
