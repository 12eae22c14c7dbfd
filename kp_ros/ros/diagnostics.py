"""The /diagnostics message every kp_ros node publishes: one DiagnosticStatus whose values
are the node's counters, rates and latencies, formatted the same way everywhere."""
from __future__ import annotations

import statistics

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.time import Time


def latency_values(seconds, name: str = "latency") -> dict[str, float]:
    """Median and max of latencies in seconds, as the (ms) values the nodes report."""
    ordered = sorted(seconds)
    return {f"{name} median (ms)": 1e3 * statistics.median(ordered) if ordered else 0.0,
            f"{name} max (ms)": 1e3 * ordered[-1] if ordered else 0.0}


def stamp_age(node, stamp) -> float:
    """Seconds from a header stamp to now on the node's clock: sim time (/clock) under
    use_sim_time, so a replayed bag's frames are seconds old, not years."""
    return (node.get_clock().now().nanoseconds - Time.from_msg(stamp).nanoseconds) / 1e9


def diagnostic_array(node, what: str, hardware_id: str, values: dict,
                     warning: str | None = None) -> DiagnosticArray:
    """One status named '<node fqn>: <what>', OK or WARN with ``warning`` as its message;
    floats with two decimals."""
    status = DiagnosticStatus(name=f"{node.get_fully_qualified_name()}: {what}",
                              hardware_id=hardware_id, level=DiagnosticStatus.OK, message="ok")
    if warning:
        status.level, status.message = DiagnosticStatus.WARN, warning
    status.values = [KeyValue(key=k, value=f"{v:.2f}" if isinstance(v, float) else str(v))
                     for k, v in values.items()]
    array = DiagnosticArray(status=[status])
    array.header.stamp = node.get_clock().now().to_msg()
    return array
