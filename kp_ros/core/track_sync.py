"""TrackSynchronizer: pairs Keypoints (by stamp) with the Matches whose newer frame they
are, whichever arrives first, in bounded buffers, and hands each frame to a ``TrackBook``
(kp_ros/core/tracks.py). A frame whose Matches never come starts new tracks after
``timeout`` seconds, or at once when Matches of a newer frame arrived (the matcher
publishes in order: it skipped this one, e.g. a drop on a slow device or a stream reset).
Frames come out in stamp order. Matches computed on another image size than the frame's
Keypoints (two cameras on one topic, a resize in between) are refused: the frame starts
new tracks and ``counters["size mismatch"]`` counts it.

Pure, no ROS: track_node drives it with its monotonic clock, the tests with a fake one.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kp_ros.core.tracks import FrameTracks, MatchSet, TrackBook, as_points


@dataclass
class _Pending:
    keypoints: np.ndarray
    arrived: float
    payload: object = None
    size: tuple[int, int] | None = None  # (width, height) of the image, when known


@dataclass
class TrackSynchronizer:
    """Pairs keypoints and matches by stamp for a ``TrackBook``; see the module docstring.

    Every ``add_*``/``poll`` returns the frames that became ready, oldest first. ``now`` is
    the caller's clock in seconds (monotonic time in the node), never a message stamp, so
    replayed bags and live cameras time out alike."""
    book: TrackBook
    timeout: float = 1.0
    max_pending: int = 32
    counters: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self._keypoints: dict[int, _Pending] = {}
        self._matches: dict[int, MatchSet] = {}
        self._match_sizes: dict[int, tuple[int, int]] = {}  # (width, height) per matches stamp
        self._published: int | None = None   # stamp of the last frame handed out
        # Newest newer-frame stamp seen in matches: the matcher publishes in stamp order, so
        # a frame older than this without matches of its own will never get any.
        self._matcher_past: int | None = None

    def add_keypoints(self, stamp_ns: int, keypoints, now: float, payload=None,
                      size: tuple[int, int] | None = None) -> list[FrameTracks]:
        """``size``: (width, height) of the image the keypoints are in, when known."""
        if self._published is not None and stamp_ns <= self._published:
            # A loop or a clock reset: whatever is pending belongs to the old stream.
            out = self.flush("stream restarted")
            self._matches.clear()
            self._match_sizes.clear()
            self._published = self._matcher_past = None
            self.book.reset()
            self.counters["stream restarts"] += 1
            return out + self.add_keypoints(stamp_ns, keypoints, now, payload, size)
        if stamp_ns in self._keypoints:
            self.counters["duplicate keypoints"] += 1
        self._keypoints[stamp_ns] = _Pending(as_points(keypoints), now, payload, size)
        out = []
        while len(self._keypoints) > self.max_pending:  # bounded: the oldest goes out unlinked
            out += self._emit(min(self._keypoints), None, "pending buffer full")
            self.counters["forced out"] += 1
        return out + self.poll(now)

    def add_matches(self, matches: MatchSet, now: float,
                    size: tuple[int, int] | None = None) -> list[FrameTracks]:
        """``size``: (width, height) of the images the matches were found in, when known."""
        if self._published is not None and matches.stamp_ns <= self._published:
            self.counters["late matches"] += 1  # its frame went out already
            return self.poll(now)
        if self._matcher_past is not None and matches.stamp_ns < self._matcher_past:
            self._matcher_past = None  # the matcher restarted on older stamps
        self._matcher_past = max(self._matcher_past or matches.stamp_ns, matches.stamp_ns)
        self._matches[matches.stamp_ns] = matches
        if size is not None:
            self._match_sizes[matches.stamp_ns] = size
        while len(self._matches) > self.max_pending:
            self._drop_matches(min(self._matches))
        return self.poll(now)

    def poll(self, now: float) -> list[FrameTracks]:
        """Hand out, in stamp order, every pending frame that can be decided now."""
        out = []
        while self._keypoints:
            stamp = min(self._keypoints)
            matches = self._matches.get(stamp)
            if matches is not None:  # its older frame, if pending, is older still: gone already
                out += self._emit(stamp, matches, None)
            elif self._matcher_past is not None and self._matcher_past > stamp:
                # The matcher publishes in order and has moved past this frame.
                out += self._emit(stamp, None, "the matcher skipped this frame (reset or drop)")
            elif now - self._keypoints[stamp].arrived >= self.timeout:
                self.counters["timed out"] += 1
                out += self._emit(stamp, None, f"no matches within {self.timeout:g} s")
            else:
                break
        return out

    def _emit(self, stamp: int, matches: MatchSet | None, why: str | None) -> list[FrameTracks]:
        pending = self._keypoints.pop(stamp)
        self._matches.pop(stamp, None)
        match_size = self._match_sizes.pop(stamp, None)
        for old in [s for s in self._matches if s < stamp]:  # their frames are gone
            self._drop_matches(old)
        if matches is not None and None not in (match_size, pending.size) \
                and match_size != pending.size:
            self.counters["size mismatch"] += 1
            matches, why = None, (f"matches for a {match_size[0]}x{match_size[1]} image, "
                                  f"keypoints for {pending.size[0]}x{pending.size[1]}")
        self._published = stamp
        return [self.book.add(stamp, pending.keypoints, matches, why, pending.payload)]

    def _drop_matches(self, stamp: int) -> None:
        del self._matches[stamp]
        self._match_sizes.pop(stamp, None)
        self.counters["matches without keypoints"] += 1

    def flush(self, why: str) -> list[FrameTracks]:
        """Hand out every pending frame now, unlinked unless its matches are here."""
        out = []
        while self._keypoints:
            stamp = min(self._keypoints)
            matches = self._matches.get(stamp)
            out += self._emit(stamp, matches, None if matches is not None else why)
        return out

    @property
    def pending(self) -> int:
        return len(self._keypoints)
