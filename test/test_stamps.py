"""kp_ros.core.stamps: the one checked header stamp -> nanoseconds conversion."""
from types import SimpleNamespace

import pytest

from kp_ros.bags.messages import stamp_to_ns
from kp_ros.core.stamps import BadStamp, stamp_ns, stamp_problem


def stamp(sec, nanosec):
    return SimpleNamespace(sec=sec, nanosec=nanosec)


def test_valid_stamps():
    assert stamp_ns(stamp(0, 0)) == 0
    assert stamp_ns(stamp(1341847980, 722988000)) == 1341847980_722988000
    assert stamp_ns(stamp(2**31 - 1, 999_999_999)) == (2**31 - 1) * 10**9 + 999_999_999
    assert stamp_problem(stamp(5, 1)) is None


@pytest.mark.parametrize("sec, nanosec, words", [
    (-5, 0, "negative"), (-1, 999_999_999, "negative"), (3, 1_000_000_000, "nanosec"),
    (3, -1, "nanosec"), (2**31, 0, "beyond"), (2**63, 0, "beyond"), (None, 0, "not a"),
])
def test_bad_stamps_are_a_reason_not_a_crash(sec, nanosec, words):
    problem = stamp_problem(stamp(sec, nanosec))
    assert problem is not None and problem.startswith("bad stamp") and words in problem
    with pytest.raises(BadStamp, match=words):
        stamp_ns(stamp(sec, nanosec))
    with pytest.raises(ValueError):  # the bag tools' conversion is the same checked one
        stamp_to_ns(stamp(sec, nanosec))


def test_rosbags_and_rclpy_times():
    from kp_ros.bags.messages import kp_ros_typestore, time_msg
    assert stamp_ns(time_msg(kp_ros_typestore(), 12_000_000_005)) == 12_000_000_005
    builtin = pytest.importorskip("builtin_interfaces.msg")
    assert stamp_ns(builtin.Time(sec=7, nanosec=3)) == 7_000_000_003
    assert "negative" in stamp_problem(builtin.Time(sec=-5, nanosec=0))


def test_keypoint_threshold_range_is_the_descriptors():
    """The descriptor's [0, 1] is what the core accepts (1.0 used to be refused)."""
    from kp_ros.core.params import spec
    from kp_ros.core.superpoint import SuperPointParams
    threshold = spec("superpoint_node", "keypoint_threshold")
    for value in (threshold.low, threshold.high):
        assert SuperPointParams(keypoint_threshold=value).validated().keypoint_threshold == value
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SuperPointParams(keypoint_threshold=1.01).validated()
