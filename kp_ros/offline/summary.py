"""process_bag's counts and the reasons for rejected frames and stream resets, grouped,
as the summary it prints (and process_bags records per bag)."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field


def reason_key(reason: str) -> str:
    """Group reasons that differ only in numbers ('stamp jumped 3.1 s' ~ 'stamp jumped 7.0 s')."""
    return re.sub(r"-?\d+(\.\d+)?", "#", reason)[:120]


@dataclass
class Summary:
    input: str = ""
    output: str = ""
    topic: str = ""
    msgtype: str = ""
    storage: str = ""
    frames: int = 0             # image messages read
    processed: int = 0          # frames that produced their outputs
    keypoints_msgs: int = 0
    keypoints_total: int = 0
    matches_msgs: int = 0
    matches_total: int = 0
    inliers_total: int = 0
    tracks_msgs: int = 0
    tracks_linked: int = 0      # keypoints linked to the previous frame's, over all frames
    stereo_msgs: int = 0        # --stereo: StereoMatches written (one per pair)
    stereo_total: int = 0       # left-right matches that passed the stereo checks
    stereo_depths: int = 0      # of those, with a depth
    stereo_unpaired: int = 0    # images without a partner of the other side (dropped)
    vins_msgs: int = 0          # --vins: feature clouds written (one per Tracks)
    vins_skipped: int = 0       # Tracks without a cloud (camera_info for another image size)
    copied: int = 0             # input messages copied through
    seconds: float = 0.0
    rejected: Counter = field(default_factory=Counter)  # reason_key -> frames
    resets: Counter = field(default_factory=Counter)    # reason_key -> stream resets
    examples: dict = field(default_factory=dict)        # reason_key -> first full reason
    events: list = field(default_factory=list)          # (kind, reason) of the current frame

    def note(self, counter: Counter, reason: str) -> None:
        key = reason_key(reason)
        counter[key] += 1
        self.examples.setdefault(key, reason)
        self.events.append(("frame rejected" if counter is self.rejected else "stream reset", reason))

    def text(self) -> str:
        def per(total, msgs):
            return f"{total / msgs:.1f}" if msgs else "-"
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"process_bag: {self.input} {self.topic} ({self.msgtype}) -> {self.output} ({self.storage})",
            f"  frames            {self.frames} read, {self.processed} processed "
            f"in {self.seconds:.1f} s ({rate:.2f} frames/s)",
            f"  keypoints         {self.keypoints_msgs} messages, "
            f"{per(self.keypoints_total, self.keypoints_msgs)} keypoints/frame",
            f"  matches           {self.matches_msgs} messages, "
            f"{per(self.matches_total, self.matches_msgs)} matches/frame"
            + (f", {per(self.inliers_total, self.matches_msgs)} inliers/frame" if self.inliers_total else ""),
            f"  rejected frames   {sum(self.rejected.values())}",
        ]
        if self.tracks_msgs:
            lines.insert(-1, f"  tracks            {self.tracks_msgs} messages, "
                             f"{per(self.tracks_linked, self.tracks_msgs)} linked keypoints/frame")
        if self.stereo_msgs:
            lines.insert(-1, f"  stereo            {self.stereo_msgs} pairs, "
                             f"{per(self.stereo_total, self.stereo_msgs)} left-right matches/pair, "
                             f"{per(self.stereo_depths, self.stereo_msgs)} with depth; "
                             f"{self.stereo_unpaired} images unpaired")
        if self.vins_msgs or self.vins_skipped:
            lines.insert(-1, f"  vins feature      {self.vins_msgs} clouds"
                             + (f", {self.vins_skipped} Tracks without (camera_info for another "
                                f"image size)" if self.vins_skipped else ""))
        lines += [f"    {n} x {self.examples[k]}" for k, n in self.rejected.most_common()]
        lines.append(f"  stream resets     {sum(self.resets.values())}")
        lines += [f"    {n} x {self.examples[k]}" for k, n in self.resets.most_common()]
        if self.copied:
            lines.append(f"  copied through    {self.copied} input messages")
        return "\n".join(lines)
