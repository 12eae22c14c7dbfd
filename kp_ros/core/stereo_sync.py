"""Left/right pairing of a stereo camera's frames by header stamp. ROS-free.

Exact stamps by default (drivers that trigger both sensors stamp them alike); a
``tolerance`` in seconds pairs frames stamped a little apart, each with the closest
partner. Frames of one side arrive in stamp order, so a frame older than the other side's
newest minus the tolerance can never be paired any more: it is dropped and counted, and so
is the oldest waiting frame beyond ``max_pending`` (memory stays bounded whatever arrives).

Invariant, per side: ``received = paired + dropped + pending``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SIDES = ("left", "right")


@dataclass(frozen=True)
class StereoPair:
    """One left and one right frame taken as the same instant (``stamp_ns``: the left's)."""
    stamp_ns: int
    left: object
    right: object
    right_stamp_ns: int


@dataclass
class SideCounts:
    received: int = 0
    paired: int = 0
    dropped: int = 0


@dataclass
class StereoSync:
    """``push(side, stamp_ns, item)`` -> a StereoPair when ``item`` completes one, else None."""
    tolerance: float = 0.0  # seconds
    max_pending: int = 8    # frames waiting per side at most
    counts: dict = field(default_factory=lambda: {side: SideCounts() for side in SIDES})

    def __post_init__(self):
        if not self.tolerance >= 0.0:
            raise ValueError(f"stereo_sync_tolerance must be >= 0 s, got {self.tolerance!r}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending!r}")
        self._pending = {side: deque() for side in SIDES}  # (stamp_ns, item), arrival order
        self._newest = {side: None for side in SIDES}

    def push(self, side: str, stamp_ns: int, item) -> StereoPair | None:
        if side not in SIDES:
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        other = SIDES[1 - SIDES.index(side)]
        stamp_ns = int(stamp_ns)
        self.counts[side].received += 1
        if self._newest[side] is None or stamp_ns > self._newest[side]:
            self._newest[side] = stamp_ns
        slack = round(self.tolerance * 1e9)
        partners = self._pending[other]
        best = min(partners, key=lambda waiting: abs(waiting[0] - stamp_ns), default=None)
        if best is not None and abs(best[0] - stamp_ns) <= slack:
            partners.remove(best)
            self.counts[side].paired += 1
            self.counts[other].paired += 1
            self._expire(other)
            pair = {side: (stamp_ns, item), other: best}
            return StereoPair(pair["left"][0], pair["left"][1], pair["right"][1], pair["right"][0])
        self._pending[side].append((stamp_ns, item))
        self._expire(side)
        self._expire(other)
        return None

    @property
    def pending(self) -> dict[str, int]:
        return {side: len(self._pending[side]) for side in SIDES}

    def reset(self) -> None:
        """Drop (and count) every waiting frame, e.g. after a stream restart."""
        for side in SIDES:
            self.counts[side].dropped += len(self._pending[side])
            self._pending[side].clear()
            self._newest[side] = None

    def describe(self) -> dict[str, int]:
        """The counters, flat (for /diagnostics and summaries)."""
        out = {}
        for side in SIDES:
            counts = self.counts[side]
            out.update({f"{side}_received": counts.received,
                        f"{side}_dropped_unpaired": counts.dropped,
                        f"{side}_pending": len(self._pending[side])})
        out["pairs"] = self.counts["left"].paired
        return out

    def _expire(self, side: str) -> None:
        """Drop ``side``'s frames that no future frame of the other side can pair with."""
        waiting, newest_other = self._pending[side], self._newest[SIDES[1 - SIDES.index(side)]]
        slack = round(self.tolerance * 1e9)
        if newest_other is not None:
            kept = deque(entry for entry in waiting if entry[0] >= newest_other - slack)
            self.counts[side].dropped += len(waiting) - len(kept)
            waiting.clear()
            waiting.extend(kept)
        while len(waiting) > self.max_pending:
            waiting.popleft()
            self.counts[side].dropped += 1
