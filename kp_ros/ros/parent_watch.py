"""Nodes do not outlive the process that started them (``ros2 launch``, ``ros2 run``).

``ros2 launch`` stops its nodes on Ctrl-C (SIGINT), but on SIGTERM (what ``docker stop``
and ``systemctl stop`` send it) or SIGKILL it ends at once and its nodes would run on as
orphans, holding the CPU or GPU. A daemon thread watches the parent: when it is gone (the
node was re-parented), the node sends itself SIGTERM, which run_node turns into the same
clean shutdown as Ctrl-C (frame in progress finished, counters logged).

A thread, not Linux's PR_SET_PDEATHSIG: that signal fires when the parent *thread* that
forked the node ends, which a launcher with worker threads does while still running.
``KP_ROS_EXIT_WITH_PARENT=0`` turns the watch off (a node started with ``nohup ... &``
that must outlive its shell).
"""
from __future__ import annotations

import os
import signal
import threading

POLL_PERIOD = 0.5  # s: an orphan stops within about this long
ENV = "KP_ROS_EXIT_WITH_PARENT"


def watch_parent(on_orphaned=None, period: float = POLL_PERIOD) -> threading.Thread | None:
    """Start the watch; ``on_orphaned(parent_pid)`` (e.g. a log line) runs before the SIGTERM.
    None when turned off by the environment or when already orphaned (parent pid 1: a
    container's init or a daemon, nothing to follow)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    parent = os.getppid()
    if parent <= 1:
        return None

    def run() -> None:
        stop = threading.Event()
        while not stop.wait(period):
            if os.getppid() != parent:
                if on_orphaned is not None:
                    try:
                        on_orphaned(parent)
                    except Exception:  # noqa: BLE001 - the shutdown matters more than the log
                        pass
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=run, name="kp_ros_parent_watch", daemon=True)
    thread.start()
    return thread
