"""Warm-up: a model's first frames on CUDA pay for the context, the cuBLAS / cuDNN handles,
the algorithm choice and lazily loaded kernels (seconds). Nodes run two dummy frames at
start, before they subscribe, so the first camera frames (and the latency diagnostics)
see the steady-state time; the start-up line reports what the warm-up took."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

WARM_UP_FRAMES = 2  # the first pays the set-up; the second any lazy init the first left
WARM_UP_SIZE = (480, 640)  # the reference processors' model size, a common camera size


def needs_warm_up(device) -> bool:
    """Only CUDA pays a first-call cost worth hiding (on CPU the first frame is ~as fast)."""
    return torch.device(device).type == "cuda"


def dummy_frame(size: tuple[int, int] = WARM_UP_SIZE, seed: int = 0) -> np.ndarray:
    """uint8 RGB noise: keypoints and matches exist, so every kernel of a frame runs."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def warm_up(step: Callable[[np.ndarray], object], device,
            frames: int = WARM_UP_FRAMES) -> float | None:
    """``step(image)`` on ``frames`` dummy frames when ``device`` needs it: the seconds
    taken, or None when skipped. ``step`` returns host (numpy) results, so the time
    includes the device's work."""
    if not needs_warm_up(device):
        return None
    image = dummy_frame()
    started = time.perf_counter()
    for _ in range(frames):
        step(image)
    return time.perf_counter() - started


def describe_warm_up(seconds: float | None, frames: int = WARM_UP_FRAMES) -> str:
    """The start-up line's part: '' when skipped."""
    return "" if seconds is None else f"; warm-up {frames} frames in {seconds:.2f} s"
