"""Harness for starting and stopping kp_ros node processes (tests, benchmarks, the demo,
the soak run)."""
