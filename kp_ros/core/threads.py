"""CPU thread counts for the core's small pre/post-processing ops: changed only when asked.

``torch.set_num_threads`` and ``cv2.setNumThreads`` are process-wide, so the core never
touches them on its own: a library user gets no hidden side effect. The entry points that
run beside other busy processes opt in explicitly (``one_thread_small_ops=True`` on
``SuperPointDetector``: superpoint_node does, see kp_ros/nodes/superpoint_node.py).

Why opt in: each small op on a 640x480 map (gray conversion, NMS, thresholds, sampling) is
a separate OpenMP region; when another process (say, the other kp_ros node) keeps the cores
busy, every region waits for a descheduled worker: measured 1.3 -> 300 ms (preprocess) and
13 -> 1900 ms (post-process) with two threads, 10 / 90 ms with one. Uncontended, one thread
costs ~1 ms + ~5 ms. The convolutions keep all threads either way.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext

import cv2
import torch

_lock = threading.Lock()
_users = 0
_saved = (1, 1)  # torch, OpenCV


def small_ops_threads(device: torch.device, one_thread: bool):
    """The context the small ops run in: ``one_cpu_thread(device)`` when ``one_thread``
    (the caller opted in), else nothing changes."""
    return one_cpu_thread(device) if one_thread else nullcontext()


@contextmanager
def one_cpu_thread(device: torch.device):
    """torch and OpenCV single-threaded for the duration, on CPU (other devices: no change).
    Nested / concurrent users (two threads of one process) restore the counts once, when
    the last one leaves."""
    global _users, _saved
    if device.type != "cpu":
        yield
        return
    with _lock:
        if _users == 0:
            _saved = (torch.get_num_threads(), cv2.getNumThreads())
            torch.set_num_threads(1)
            cv2.setNumThreads(1)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                torch.set_num_threads(_saved[0])
                cv2.setNumThreads(_saved[1])
