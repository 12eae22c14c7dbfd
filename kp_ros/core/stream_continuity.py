"""Decide whether a new frame continues the stream the matcher is following.

Matching a frame against its predecessor only makes sense when both come from the
same unbroken stream: same size and encoding, and a stamp moving forward by no more
than ``max_frame_gap`` seconds. A bag that loops, a camera that restarts or a
reconfigured driver each break it; the matcher must then start over.
"""
from __future__ import annotations

from dataclasses import dataclass

from kp_ros.core.params import spec


@dataclass(frozen=True)
class FrameInfo:
    stamp_ns: int
    height: int
    width: int
    encoding: str


class StreamContinuity:
    """Remembers the last accepted frame; ``check`` says why a new one breaks the stream."""

    def __init__(self, max_frame_gap: float = spec("eloftr_node", "max_frame_gap").default):
        self.max_frame_gap = max_frame_gap  # seconds; <= 0 disables the gap check
        self._last: FrameInfo | None = None

    def reset(self) -> None:
        self._last = None

    def check(self, frame: FrameInfo) -> str | None:
        """Record ``frame`` and return None if it continues the stream, else the reason
        it breaks it (None as well for the very first frame: nothing to break)."""
        last, self._last = self._last, frame
        if last is None:
            return None
        if (frame.height, frame.width) != (last.height, last.width):
            return f"image size changed {last.width}x{last.height} -> {frame.width}x{frame.height}"
        if frame.encoding != last.encoding:
            return f"encoding changed {last.encoding} -> {frame.encoding}"
        gap_ns = frame.stamp_ns - last.stamp_ns
        if gap_ns <= 0:
            return (f"stamp went {'backwards' if gap_ns < 0 else 'nowhere'} by {-gap_ns / 1e9:.3f} s "
                    f"(bag loop or clock reset?)")
        if self.max_frame_gap > 0 and gap_ns > self.max_frame_gap * 1e9:
            return f"stamp jumped {gap_ns / 1e9:.3f} s > max_frame_gap {self.max_frame_gap} s"
        return None
