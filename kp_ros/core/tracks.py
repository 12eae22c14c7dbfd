"""Feature tracks: persistent ids that link one frame's keypoints to the next frame's
through the matches between the two frames.

- ``associate``: for frames t-1 and t, keypoint i of t-1 and keypoint j of t are linked
  when a match has its older point within ``association_radius`` px of i and its newer
  point within the radius of j (each match point takes its *nearest* keypoint); links are
  one-to-one, the higher match score wins a conflict (greedy by score), and only
  geometric inliers count when the matches carry inlier flags and ``inliers_only``.
- ``link_by_index``: a sparse matcher's Matches carry keypoint indices: links are those
  pairs (one-to-one, filtered as above), no radius.
- ``TrackBook``: gives each frame's keypoints their track ids (never reused), lengths and
  the index of the same track in the frame they were linked from.
- ``TrackSynchronizer`` (kp_ros/core/track_sync.py) pairs each frame's keypoints with its
  matches for a ``TrackBook``, whichever arrives first.

Pure numpy, no ROS: the node, process_bag and the tests drive the same code.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, fields, replace

import numpy as np

from kp_ros.core.params import ASSOCIATION_CHOICES, spec

# A nearest-neighbour grid cell is at least this big, so a tiny radius cannot ask for a
# huge table; the 3x3 cell neighbourhood still covers the radius.
_MIN_CELL = 2.0
ASSOCIATIONS = ASSOCIATION_CHOICES


@dataclass(frozen=True)
class TrackParams:
    """Runtime settings; defaults (and what each means) in kp_ros/core/params.py."""
    association_radius: float = spec("track_node", "association_radius").default  # px
    association: str = spec("track_node", "association").default  # 'flow' | 'points', see associate()
    inliers_only: bool = spec("track_node", "inliers_only").default
    min_match_score: float = spec("track_node", "min_match_score").default

    def validated(self) -> "TrackParams":
        radius = self.association_radius
        if isinstance(radius, bool) or not isinstance(radius, (int, float, np.number)) \
                or not math.isfinite(radius) or not 0.0 < radius <= 64.0:
            raise ValueError(f"association_radius must be a number in (0, 64] px, got {radius!r}")
        if self.association not in ASSOCIATIONS:
            raise ValueError(f"association must be one of {', '.join(ASSOCIATIONS)}, "
                             f"got {self.association!r}")
        if not isinstance(self.inliers_only, (bool, np.bool_)):
            raise ValueError(f"inliers_only must be a bool, got {self.inliers_only!r}")
        score = self.min_match_score
        if isinstance(score, bool) or not isinstance(score, (int, float, np.number)) \
                or not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise ValueError(f"min_match_score must be a number in [0, 1], got {score!r}")
        return replace(self, association_radius=float(radius), inliers_only=bool(self.inliers_only),
                       min_match_score=float(score))

    @classmethod
    def from_values(cls, values: dict) -> "TrackParams":
        """Validated settings from a node's parameter values (the same names)."""
        return cls(**{name: values[name] for name in TRACK_PARAM_NAMES}).validated()


# The node parameters TrackParams takes (its field names).
TRACK_PARAM_NAMES = tuple(f.name for f in fields(TrackParams))


@dataclass(frozen=True)
class MatchSet:
    """The matches between an older frame (``stamp0_ns``) and a newer one (``stamp_ns``)."""
    stamp_ns: int
    stamp0_ns: int
    points0: np.ndarray           # (M, 2) x, y in the older frame
    points1: np.ndarray           # (M, 2) in the newer frame
    scores: np.ndarray            # (M,)
    inliers: np.ndarray | None = None  # (M,) flags, or None when not verified
    # (M,) keypoint indices into the older / newer frame's keypoints (a sparse matcher),
    # or None: then links are found by position (associate).
    index0: np.ndarray | None = None
    index1: np.ndarray | None = None


@dataclass
class FrameTracks:
    """One frame's tracks: the fields of kp_ros/Tracks, plus where they came from."""
    stamp_ns: int
    keypoints: np.ndarray         # (N, 2) float32, the frame's keypoints in their order
    ids: np.ndarray               # (N,) uint64
    lengths: np.ndarray           # (N,) uint32, 1 = new
    previous_index: np.ndarray    # (N,) int32, -1 = new
    linked_from_ns: int | None = None  # stamp of the frame it was linked to, None if all new
    why_new: str | None = None    # why the frame was not linked, None if it was
    payload: object = None        # whatever the caller attached to the frame (e.g. the header)


def as_points(points) -> np.ndarray:
    """(N, 2) float32 from an (N, 2) array or a pair of (N,) x, y arrays."""
    if isinstance(points, tuple) and len(points) == 2:
        points = np.stack([np.asarray(points[0]), np.asarray(points[1])], axis=-1)
    return np.ascontiguousarray(np.asarray(points, dtype=np.float32).reshape(-1, 2))


class PointGrid:
    """Points in a uniform grid for nearest-neighbour queries within ``radius``.

    Cells are >= 2 * radius, so the disc around a query touches at most the 2x2 cells
    from its corner: O(M + N) numpy passes (OpenCV's brute-force matcher takes ~9 ms and
    FLANN ~3 ms for 2000 x 1024; scipy's cKDTree ~0.7 ms, and is not a dependency). Built
    once per frame: the track book keeps each frame's grid, used again when that frame is
    the older one of the next pair. Column-wise arrays and ``np.take`` on whole rows
    throughout: fancy indexing of (N, 2) rows and reductions along axis 0 cost 3-10x more
    at these sizes, and track_node's budget is 2 ms a frame (bench/bench_tracks.py)."""

    def __init__(self, points, radius: float):
        points = as_points(points)
        self.radius = float(radius)
        self.points = points
        xs, ys = np.ascontiguousarray(points[:, 0]), np.ascontiguousarray(points[:, 1])
        valid = np.isfinite(xs) & np.isfinite(ys)
        self.empty = not valid.any()
        if self.empty:
            return
        kept = None if valid.all() else np.flatnonzero(valid)
        if kept is not None:
            xs, ys = xs[kept], ys[kept]
        cell = max(2.0 * self.radius, _MIN_CELL)
        self._scale = np.float32(1.0 / cell)
        # An empty ring of cells around the points: a query's 2x2 block never leaves the grid.
        self._x0, self._y0 = xs.min() - np.float32(cell), ys.min() - np.float32(cell)
        cx = ((xs - self._x0) * self._scale).astype(np.intp)  # >= 0: truncation is floor
        cy = ((ys - self._y0) * self._scale).astype(np.intp)
        self._w, self._h = int(cx.max()) + 2, int(cy.max()) + 2
        flat = cy * self._w + cx
        order = np.argsort(flat, kind="stable")
        flat_sorted = flat[order]
        rank = np.arange(len(flat_sorted)) - np.searchsorted(flat_sorted, flat_sorted, side="left")
        # Per cell, up to K points: their index (-1 = none) and coordinates (inf = none,
        # never within the radius, so empty slots need no mask).
        slots = (self._h * self._w, int(rank.max()) + 1)
        self._index = np.full(slots, -1, np.int32)
        self._xs = np.full(slots, np.inf, np.float32)
        self._ys = np.full(slots, np.inf, np.float32)
        self._index[flat_sorted, rank] = order if kept is None else kept[order]
        self._xs[flat_sorted, rank] = xs[order]
        self._ys[flat_sorted, rank] = ys[order]
        self._block = np.array([0, 1, self._w, self._w + 1], np.intp)

    def query(self, queries) -> np.ndarray:
        """For each query (M, 2), the index of its nearest point within the radius, else -1."""
        queries = as_points(queries)
        m = len(queries)
        if self.empty or not m:
            return np.full(m, -1, np.int64)
        qx, qy = queries[:, 0], queries[:, 1]
        # Far, infinite or NaN queries are clamped into an edge cell, where every distance
        # is then too large, or NaN, to be a hit.
        rx = np.float32(self.radius) + self._x0
        ry = np.float32(self.radius) + self._y0
        # fmax, not maximum: it takes the 0 where the other side is NaN.
        cx = np.minimum(np.fmax((qx - rx) * self._scale, 0), self._w - 2).astype(np.intp)
        cy = np.minimum(np.fmax((qy - ry) * self._scale, 0), self._h - 2).astype(np.intp)
        with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN queries: never hits
            rows = (cy * self._w + cx)[:, None] + self._block         # (M, 4) cells
            d2 = np.take(self._xs, rows, axis=0).reshape(m, -1)        # (M, 4K) candidates
            d2 -= qx[:, None]
            d2 *= d2
            dy = np.take(self._ys, rows, axis=0).reshape(m, -1)
            dy -= qy[:, None]
            dy *= dy
            d2 += dy
        best = d2.argmin(1)
        width = d2.shape[1]
        hit = d2.ravel()[np.arange(m) * width + best] <= np.float32(self.radius) ** 2
        k = self._index.shape[1]
        cells = rows.ravel()[np.arange(m) * 4 + best // k]
        return np.where(hit, self._index.ravel()[cells * k + best % k], -1).astype(np.int64, copy=False)


def nearest_within(queries, points, radius: float) -> np.ndarray:
    """For each query (M, 2), the index of its nearest point (N, 2) within ``radius``, else -1."""
    return PointGrid(points, radius).query(queries)


def _grid(points, radius: float) -> PointGrid:
    """``points`` as a PointGrid for ``radius`` (a given grid is reused when it fits)."""
    if isinstance(points, PointGrid) and points.radius == float(radius):
        return points
    return PointGrid(points.points if isinstance(points, PointGrid) else points, radius)


def _by_score(score, idx0, idx1) -> np.ndarray:
    """The order by descending score, ties broken by (idx0, idx1): deterministic.

    One argsort of a packed uint64 key where it fits (the bits of a float32 >= 0 sort as
    the number does) instead of a 3-key lexsort, which costs ~5x more at 2000 matches."""
    score = np.asarray(score, np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    span1 = int(idx1.max()) + 1 if len(idx1) else 1
    span = (int(idx0.max()) + 1 if len(idx0) else 1) * span1
    if not len(score) or score.min() < 0 or span > 1 << 32:
        return np.lexsort((idx1, idx0, -score))
    key = (np.uint64(0xFFFFFFFF) - score.view(np.uint32).astype(np.uint64)) << np.uint64(32)
    key |= (idx0.astype(np.uint64) * np.uint64(span1) + idx1.astype(np.uint64))
    return np.argsort(key, kind="stable")


def associate(keypoints0, keypoints1, points0, points1, scores, radius: float,
              inliers=None, min_score: float = 0.0,
              mode: str = "points") -> tuple[np.ndarray, np.ndarray]:
    """One-to-one links (idx0, idx1) between keypoints of the older and the newer frame.

    Match k votes for i = the keypoint nearest to points0[k] (within ``radius``) and j =
    ``mode`` 'points': the keypoint nearest to points1[k] (within ``radius``), the issue's
    rule; 'flow': the keypoint nearest to i + (points1[k] - points0[k]), i.e. i moved by the
    match's displacement. EfficientLoFTR's older points sit on its 8 px coarse grid, so a
    match rarely lands on a keypoint; carrying its motion to the keypoint instead of
    asking its newer point to land near j too keeps ~3x more links at radius 3 px with
    99.8 % of them right (test_tracks.py, README). Only flagged matches vote when
    ``inliers`` is given. Conflicts (two links sharing a keypoint) go to the higher score,
    as a greedy pass by descending score does. ``keypoints0``/``keypoints1`` may be
    PointGrids, reused when built for ``radius``."""
    if mode not in ASSOCIATIONS:
        raise ValueError(f"association mode must be one of {ASSOCIATIONS}, got {mode!r}")
    points0, points1 = as_points(points0), as_points(points1)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if not (len(points0) == len(points1) == len(scores)):
        raise ValueError(f"matches need as many points0 ({len(points0)}), points1 ({len(points1)}) "
                         f"and scores ({len(scores)})")
    keep = np.isfinite(scores) & (scores >= min_score)
    if inliers is not None:
        inliers = np.asarray(inliers).reshape(-1)
        if len(inliers) != len(scores):
            raise ValueError(f"inliers has {len(inliers)} flags for {len(scores)} matches")
        keep &= inliers.astype(bool)
    empty = np.empty(0, np.int64)
    if not keep.any():
        return empty, empty
    grid0 = _grid(keypoints0, radius)
    # Row takes (np.take on axis 0), not boolean/fancy row indexing: ~5x faster here.
    chosen = np.flatnonzero(keep)
    idx0 = grid0.query(np.take(points0, chosen, axis=0))
    voted = idx0 >= 0  # only these need their newer keypoint looked up
    chosen, idx0 = chosen[voted], idx0[voted]
    if mode == "flow":
        # The match's displacement carried to the keypoint it voted for: where that
        # keypoint should be in the newer frame; the nearest keypoint there is j.
        moved = np.take(grid0.points, idx0, axis=0)
        moved += np.take(points1, chosen, axis=0) - np.take(points0, chosen, axis=0)
        idx1 = _grid(keypoints1, radius).query(moved)
    else:
        idx1 = _grid(keypoints1, radius).query(np.take(points1, chosen, axis=0))
    ok = idx1 >= 0
    idx0, idx1, score = idx0[ok], idx1[ok], scores[chosen[ok]]
    return _one_to_one(idx0, idx1, score)


def _one_to_one(idx0, idx1, score) -> tuple[np.ndarray, np.ndarray]:
    """The candidate links (idx0, idx1) kept one-to-one, the higher score winning."""
    empty = np.empty(0, np.int64)
    # Greedy by score, vectorised: every candidate that is the best of both its keypoints
    # is what the greedy pass would take; take all of them, drop what they block, repeat.
    order = _by_score(score, idx0, idx1)
    idx0, idx1 = idx0[order], idx1[order]
    taken0, taken1 = [empty], [empty]
    if len(idx0):
        used0 = np.zeros(int(idx0.max()) + 1, bool)
        used1 = np.zeros(int(idx1.max()) + 1, bool)
    while len(idx0):
        rank = np.arange(len(idx0))
        best0 = np.full(len(used0), len(idx0))
        np.minimum.at(best0, idx0, rank)
        best1 = np.full(len(used1), len(idx1))
        np.minimum.at(best1, idx1, rank)
        mutual = (best0[idx0] == rank) & (best1[idx1] == rank)
        taken0.append(idx0[mutual])
        taken1.append(idx1[mutual])
        used0[taken0[-1]] = True
        used1[taken1[-1]] = True
        free = ~(used0[idx0] | used1[idx1])
        idx0, idx1 = idx0[free], idx1[free]
    return np.concatenate(taken0), np.concatenate(taken1)


def link_by_index(matches: MatchSet, n0: int, n1: int, inliers=None,
                  min_score: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one links straight from a sparse matcher's keypoint indices: no radius.
    Indices outside either frame's keypoints (a Matches for other Keypoints) link nothing."""
    idx0 = np.asarray(matches.index0, np.int64).reshape(-1)
    idx1 = np.asarray(matches.index1, np.int64).reshape(-1)
    scores = np.asarray(matches.scores, np.float32).reshape(-1)
    if not (len(idx0) == len(idx1) == len(scores)):
        raise ValueError(f"matches need as many index0 ({len(idx0)}), index1 ({len(idx1)}) "
                         f"and scores ({len(scores)})")
    keep = np.isfinite(scores) & (scores >= min_score)
    keep &= (idx0 >= 0) & (idx0 < n0) & (idx1 >= 0) & (idx1 < n1)
    if inliers is not None:
        keep &= np.asarray(inliers).reshape(-1).astype(bool)
    return _one_to_one(idx0[keep], idx1[keep], scores[keep])


@dataclass
class _Remembered:
    keypoints: np.ndarray
    ids: np.ndarray
    lengths: np.ndarray
    grid: PointGrid | None = None  # the keypoints' grid, built when the frame was linked


class TrackBook:
    """Assigns track ids frame by frame; remembers the last ``history`` frames by stamp
    so a frame can be linked to the one its matches name (normally the one before)."""

    def __init__(self, params: TrackParams | None = None, history: int = 8):
        self.params = (params or TrackParams()).validated()
        self._history_size = history
        self._frames: dict[int, _Remembered] = {}
        self._next_id = 0
        self._last_stamp: int | None = None
        self.counters = Counter()

    def set_params(self, params: TrackParams) -> None:
        self.params = params.validated()  # one swap: the next frame sees all of it

    def reset(self) -> None:
        """Forget the remembered frames (ids keep counting up: never reused)."""
        self._frames.clear()
        self._last_stamp = None

    def add(self, stamp_ns: int, keypoints, matches: MatchSet | None = None,
            why_new: str | None = None, payload=None) -> FrameTracks:
        """The tracks of the frame ``stamp_ns`` with ``keypoints`` (N, 2), linked through
        ``matches`` to the older frame they name, or all new when there are none."""
        keypoints = as_points(keypoints)
        n = len(keypoints)
        if self._last_stamp is not None and stamp_ns <= self._last_stamp:
            self.reset()
            why_new = why_new or "stamp went backwards or repeated: tracks restart"
        previous = None
        if matches is not None:
            if matches.stamp_ns != stamp_ns:
                raise ValueError(f"matches are for frame {matches.stamp_ns}, not {stamp_ns}")
            previous = self._frames.get(matches.stamp0_ns)
            if previous is None and why_new is None:
                why_new = "the matches' older frame has no tracks (no keypoints, or too old)"
        elif why_new is None:
            why_new = "no matches for this frame"

        ids = np.empty(n, np.uint64)
        lengths = np.ones(n, np.uint32)
        previous_index = np.full(n, -1, np.int32)
        grid = None
        if previous is not None:
            params = self.params
            inliers = matches.inliers if params.inliers_only and matches.inliers is not None \
                and len(matches.inliers) else None
            if matches.index0 is not None:
                idx0, idx1 = link_by_index(matches, len(previous.keypoints), n, inliers,
                                           params.min_match_score)
            else:
                grid = PointGrid(keypoints, params.association_radius)
                older = previous.grid if previous.grid is not None else previous.keypoints
                idx0, idx1 = associate(older, grid, matches.points0, matches.points1,
                                       matches.scores, params.association_radius, inliers,
                                       params.min_match_score, params.association)
            ids[idx1] = previous.ids[idx0]
            lengths[idx1] = previous.lengths[idx0] + 1
            previous_index[idx1] = idx0
            why_new = None
            self.counters["linked frames"] += 1
            self.counters["links"] += len(idx1)
        else:
            self.counters["unlinked frames"] += 1
        new = previous_index < 0
        ids[new] = np.arange(self._next_id, self._next_id + int(new.sum()), dtype=np.uint64)
        self._next_id += int(new.sum())

        self._frames[stamp_ns] = _Remembered(keypoints, ids, lengths, grid)
        while len(self._frames) > self._history_size:
            del self._frames[min(self._frames)]
        self._last_stamp = stamp_ns
        return FrameTracks(stamp_ns, keypoints, ids, lengths, previous_index,
                           linked_from_ns=None if previous is None else matches.stamp0_ns,
                           why_new=why_new, payload=payload)
