"""kp_ros/core/stereo_sync.py: left/right pairing by stamp, counters, bounded memory."""
from __future__ import annotations

import pytest

from kp_ros.core.stereo_sync import StereoSync

MS = 1_000_000


def _invariant(sync: StereoSync) -> None:
    for side, counts in sync.counts.items():
        assert counts.received == counts.paired + counts.dropped + sync.pending[side], side


def test_exact_stamps_pair_whichever_side_comes_first():
    sync = StereoSync()
    assert sync.push("left", 100 * MS, "L0") is None
    pair = sync.push("right", 100 * MS, "R0")
    assert (pair.stamp_ns, pair.left, pair.right, pair.right_stamp_ns) == (100 * MS, "L0", "R0", 100 * MS)
    assert sync.push("right", 200 * MS, "R1") is None
    pair = sync.push("left", 200 * MS, "L1")
    assert (pair.left, pair.right) == ("L1", "R1")
    assert sync.describe() == {"left_received": 2, "left_dropped_unpaired": 0, "left_pending": 0,
                               "right_received": 2, "right_dropped_unpaired": 0,
                               "right_pending": 0, "pairs": 2}
    _invariant(sync)


def test_exact_by_default_a_stamp_apart_does_not_pair_and_is_dropped_later():
    sync = StereoSync()
    assert sync.push("left", 100 * MS, "L0") is None
    assert sync.push("right", 100 * MS + 1, "R0") is None  # 1 ns apart: not the same instant
    # A later pair makes both unpairable (each side arrives in stamp order): dropped, counted.
    sync.push("left", 200 * MS, "L1")
    assert sync.push("right", 200 * MS, "R1").left == "L1"
    assert sync.counts["left"].dropped == 1 and sync.counts["right"].dropped == 1
    _invariant(sync)


def test_tolerance_pairs_the_closest_partner():
    sync = StereoSync(tolerance=0.005)
    sync.push("left", 100 * MS, "L0")
    sync.push("left", 103 * MS, "L1")
    pair = sync.push("right", 102 * MS, "R0")  # 2 ms from L0, 1 ms from L1
    assert (pair.left, pair.right, pair.stamp_ns, pair.right_stamp_ns) == ("L1", "R0", 103 * MS, 102 * MS)
    assert sync.pending["left"] == 1  # L0 may still pair with a right frame up to 105 ms
    assert sync.push("right", 120 * MS, "R1") is None  # 17 ms from anything: waits
    assert sync.counts["left"].dropped == 1  # now no later right frame can pair with L0
    _invariant(sync)


def test_one_side_missing_keeps_memory_bounded_and_counts_every_drop():
    sync = StereoSync(max_pending=4)
    for i in range(50):
        assert sync.push("left", i * 100 * MS, i) is None
    assert sync.pending == {"left": 4, "right": 0}
    assert sync.counts["left"].dropped == 46
    _invariant(sync)
    sync.reset()
    assert sync.pending == {"left": 0, "right": 0} and sync.counts["left"].dropped == 50
    _invariant(sync)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="stereo_sync_tolerance"):
        StereoSync(tolerance=-1.0)
    with pytest.raises(ValueError, match="side"):
        StereoSync().push("middle", 0, None)
