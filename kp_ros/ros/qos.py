"""QoS profiles (REP-2003): sensor-data input, small reliable outputs."""
from rclpy.qos import (HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)

OUTPUT_DEPTH = 5
# Reliable input: frames wait here only while the executor is starved (the callback just
# hands them to the keep-latest slot); 5 lost frames under CPU load (scripts/soak.py).
RELIABLE_INPUT_DEPTH = 50


def image_input_qos(reliable: bool) -> QoSProfile:
    """Sensor-data (best effort, keep last 5), which connects to any publisher, or reliable
    (which only reliable publishers match, and which retransmits lost fragments: full frames
    arrive). kp_ros.ros.image_input chooses between them from the publishers."""
    if not reliable:
        return qos_profile_sensor_data
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=RELIABLE_INPUT_DEPTH,
                      reliability=ReliabilityPolicy.RELIABLE)


def output_qos() -> QoSProfile:
    """Reliable, shallow: matches both reliable and best-effort subscribers."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=OUTPUT_DEPTH,
                      reliability=ReliabilityPolicy.RELIABLE)
