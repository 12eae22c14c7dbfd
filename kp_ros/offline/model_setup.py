"""Models for the offline tools: loaded with a random-init stand-in when pretrained weights
are unavailable and the user asked for one (process_bag --random-init-fallback, the demo),
and torch set up for byte-identical runs."""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def interrupts_held():
    """SIGINT and SIGTERM held until the block ends, then raised as KeyboardInterrupt.

    A KeyboardInterrupt raised while torch's C++ code is running Python (its import, a
    model's construction) does not unwind: pybind11 calls std::terminate and the process
    dies with SIGABRT (seen in CI: Ctrl-C 1.1 s after start). Holding the signal for those
    seconds keeps Ctrl-C a clean 'interrupted', exit 130."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (e.g. a Ray worker thread)
        return
    held = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        raise KeyboardInterrupt


@contextmanager
def deterministic_torch(threads: int | None):
    """Deterministic algorithms (warn where none exists) and an optional fixed thread
    count, restored afterwards: the same bag, options and thread count give
    byte-identical messages, on the same device (on CUDA: the same GPU model, CUDA and
    cuDNN versions; kernels and their reduction orders differ between them).

    torch's warning for an op without a deterministic implementation is shown, not
    hidden (Python's default filter: once per place): on CUDA it says which output may
    differ between runs."""
    with interrupts_held():
        import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads())
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)  # random-init weights make denormals, ~8x slower on CPU
    if threads:
        torch.set_num_threads(threads)
    try:
        import cv2
        cv2.setRNGSeed(0)  # geometric verification (RANSAC) draws from OpenCV's RNG
        torch.manual_seed(0)
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])


def loud_warning(text: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n{text}\n{bar}\n", file=sys.stderr, flush=True)


def random_init_stand_in(kind: str, directory: Path) -> Path:
    """Full-size random-init ``kind`` ('superpoint' or 'eloftr') weights, seed 0, saved in
    ``directory`` like a checkpoint (once: an existing one is reused). The stand-in for
    pretrained weights that cannot be reached: the pipeline runs, its features are noise."""
    from kp_ros.core import random_init

    save = random_init.save_random_superpoint if kind == "superpoint" else random_init.save_random_eloftr
    if not (directory / "config.json").exists():
        save(directory, "full", seed=0)
    return directory


def load_models(detector_kwargs: dict | None, matcher_kwargs: dict | None,
                random_init_fallback: bool, workdir: Path):
    """(detector, matcher, detector_name, matcher_name); ModelUnavailableError unless
    ``random_init_fallback``, which substitutes full-size random-init models saved in
    ``workdir`` and names them so in every message."""
    from kp_ros.core.model_loading import ModelUnavailableError

    def load(kind: str, kwargs: dict):
        if kind == "superpoint":
            from kp_ros.core.superpoint import SuperPointDetector as cls
        else:
            from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher as cls
        try:
            return cls(**kwargs), None
        except ModelUnavailableError as err:
            if not random_init_fallback:
                raise
            loud_warning(f"WARNING: {err}\nWARNING: --random-init-fallback: using a RANDOM-INIT "
                         f"full-size {kind} model instead. Its outputs are meaningless (the "
                         f"pipeline runs, the features are noise).")
            directory = random_init_stand_in(kind, workdir / kind)
            return cls(**{**kwargs, "model": str(directory)}), f"random-init({kwargs['model']})"

    with interrupts_held():  # imports and construction run torch's C++ (see interrupts_held)
        # The small pre/post-processing ops on one thread (kp_ros/core/threads.py), as the nodes do.
        detector, detector_name = load("superpoint", {**detector_kwargs, "one_thread_small_ops": True}) \
            if detector_kwargs else (None, None)
        matcher, matcher_name = load("eloftr", matcher_kwargs) if matcher_kwargs else (None, None)
    return detector, matcher, detector_name, matcher_name
