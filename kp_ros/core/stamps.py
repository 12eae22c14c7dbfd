"""Header stamps (builtin_interfaces/Time: sec, nanosec) to int nanoseconds, checked.

Every stamp a kp_ros node, the pipeline or a bag tool turns into a number goes through
``stamp_ns``: a camera or bridge with a clock bug (a negative second, nanosec >= 1e9, a
value past any plausible clock) costs that one message, counted and logged by the caller,
never an exception out of a subscription callback (rclpy's ``Time.from_msg`` raises
ValueError on a negative second, which used to end the node).
"""
from __future__ import annotations

NS_PER_S = 1_000_000_000
# int32 sec of builtin_interfaces/Time can reach 2**31 - 1 (2038); beyond that (a uint32
# read as int64, a stamp in ns stored as s) it is garbage, not a time.
MAX_SEC = 2**31 - 1


class BadStamp(ValueError):
    """A header stamp that is not a time; the message says why."""


def stamp_problem(stamp) -> str | None:
    """Why ``stamp`` (anything with ``sec`` and ``nanosec``) is not a valid time, or None."""
    try:
        sec, nanosec = int(stamp.sec), int(stamp.nanosec)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return f"bad stamp: not a builtin_interfaces/Time ({stamp!r})"
    if sec < 0:
        return f"bad stamp: negative seconds (sec={sec}, nanosec={nanosec})"
    if sec > MAX_SEC:
        return f"bad stamp: seconds beyond any clock (sec={sec})"
    if not 0 <= nanosec < NS_PER_S:
        return f"bad stamp: nanosec out of [0, 1e9) (sec={sec}, nanosec={nanosec})"
    return None


def stamp_ns(stamp) -> int:
    """``stamp`` in int nanoseconds; BadStamp (a ValueError) with the reason otherwise."""
    problem = stamp_problem(stamp)
    if problem is not None:
        raise BadStamp(problem)
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)
