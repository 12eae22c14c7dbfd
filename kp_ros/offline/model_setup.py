"""Models for the offline tools: loaded with a random-init stand-in when pretrained weights
are unavailable and the user asked for one (process_bag --random-init-fallback, the demo),
and torch set up for byte-identical runs."""
from __future__ import annotations

import inspect
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from kp_ros.core import models
from kp_ros.core.signals import interrupts_held


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


def random_init_stand_in(name: str, directory: Path) -> Path:
    """Full-size random-init weights of the registry's model ``name``, seed 0, saved in
    ``directory`` like a checkpoint (once: an existing one is reused). The stand-in for
    pretrained weights that cannot be reached: the pipeline runs, its features are noise."""
    if not (directory / "config.json").exists():
        models.model(name).save_random(directory, "full", seed=0)
    return directory


def load_model(name: str, kwargs: dict, random_init_fallback: bool, workdir: Path):
    """(model, name shown in messages or None) for the registry's model ``name`` built from
    parameter values ``kwargs``; ModelUnavailableError unless ``random_init_fallback``,
    which substitutes a full-size random-init model saved in ``workdir`` and names it so."""
    from kp_ros.core.model_loading import ModelUnavailableError

    entry = models.model(name)
    # The small pre/post-processing ops on one thread (kp_ros/core/threads.py), as the nodes do.
    extras = {"one_thread_small_ops": True} if "one_thread_small_ops" in \
        inspect.signature(entry.model_class).parameters else {}
    with interrupts_held():  # imports and construction run torch's C++ (see interrupts_held)
        try:
            return entry.build(kwargs, **extras), None
        except ModelUnavailableError as err:
            if not random_init_fallback:
                raise
            loud_warning(f"WARNING: {err}\nWARNING: --random-init-fallback: using a RANDOM-INIT "
                         f"full-size {entry.title} model instead. Its outputs are meaningless (the "
                         f"pipeline runs, the features are noise).")
            directory = random_init_stand_in(name, workdir / name)
            return entry.build({**kwargs, "model": str(directory)}, **extras), \
                f"random-init({kwargs['model']})"


def load_models(detector_kwargs: dict | None, matcher_kwargs: dict | None,
                random_init_fallback: bool, workdir: Path, detector: str = "superpoint",
                matcher: str = "eloftr"):
    """(detector, matcher, detector_name, matcher_name): ``load_model`` for each side whose
    keywords are given (None: that side does not run)."""
    found_detector, detector_name = load_model(detector, detector_kwargs, random_init_fallback,
                                               workdir) if detector_kwargs else (None, None)
    found_matcher, matcher_name = load_model(matcher, matcher_kwargs, random_init_fallback,
                                             workdir) if matcher_kwargs else (None, None)
    return found_detector, found_matcher, detector_name, matcher_name
