"""The /diagnostics message every kp_ros node publishes: one DiagnosticStatus whose values
are the node's counters, rates and latencies, formatted the same way everywhere."""
from __future__ import annotations

import statistics

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue


def latency_values(seconds) -> dict[str, float]:
    """Median and max of latencies in seconds, as the (ms) values the nodes report."""
    ordered = sorted(seconds)
    return {"latency median (ms)": 1e3 * statistics.median(ordered) if ordered else 0.0,
            "latency max (ms)": 1e3 * ordered[-1] if ordered else 0.0}


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
