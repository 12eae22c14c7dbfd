"""process_bags on Ray: the per-bag task (process_bag's run_one in a worker), the progress
actor, a local Ray instance, and how many tasks run at once with how many threads."""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from pathlib import Path

from kp_ros.bags.reader import BagError
from kp_ros.offline.process_bag_cli import run_one
from kp_ros.offline.summary import Summary

GB_PER_TASK = 2.0  # peak RSS of both full-size models on CPU (~1.9 GB, README)


def summary_record(summary: Summary) -> dict:
    def per(total, msgs):
        return round(total / msgs, 2) if msgs else 0.0
    return {"frames": summary.frames, "processed": summary.processed,
            "keypoints_per_frame": per(summary.keypoints_total, summary.keypoints_msgs),
            "matches_per_frame": per(summary.matches_total, summary.matches_msgs),
            "resets": sum(summary.resets.values()), "rejected": sum(summary.rejected.values()),
            "reasons": {summary.examples[k]: n for k, n in (summary.resets + summary.rejected).items()}}


def bag_task(args, bag: str, output: str, options: tuple, progress=None, name: str = "") -> dict:
    """One bag, in a Ray worker: process_bag's run_one, its outcome as a JSON-able dict.
    A bad bag is a result ("failed", with the reason), not an exception, so the driver
    reports it and the other bags go on; Ctrl-C (ray.cancel) propagates, and the atomic
    writer deletes the partial output on the way out."""
    from kp_ros.core.model_loading import ModelUnavailableError

    record = {"bag": name, "input": bag, "output": output, "host": socket.gethostname(),
              "pid": os.getpid()}
    last = [0.0]

    def on_frame(frames: int) -> None:
        now = time.monotonic()
        if progress is not None and now - last[0] >= 0.5:  # ~2 updates/s per task
            last[0] = now
            progress.set.remote(name, frames)

    def log(text: str) -> None:
        print(f"{name}: {text}", file=sys.stderr, flush=True)

    options = on_assigned_gpus(options, _ray_gpu_ids(), log)
    started = time.perf_counter()
    try:
        summary = run_one(args, bag, output, *options, progress=False, on_frame=on_frame, log=log)
        record.update(status="done", **summary_record(summary))
        if progress is not None:
            progress.set.remote(name, summary.frames)
    except ModelUnavailableError as err:
        record.update(status="failed", error=f"{err} (or pass --random-init-fallback)")
    except (BagError, ValueError) as err:
        record.update(status="failed", error=str(err))
    except Exception as err:  # noqa: BLE001 - a model failure is this bag's, not the run's
        record.update(status="failed", error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def on_assigned_gpus(options: tuple, gpu_ids, log=None) -> tuple:
    """process_bag options (detector kwargs, matcher kwargs, ...) with each ``device``
    mapped to this task's GPU (model_loading.device_for_assigned_gpus): Ray makes the
    GPU(s) it assigned the only visible ones, so ``--device cuda:N`` means ``cuda`` here."""
    from kp_ros.core.model_loading import device_for_assigned_gpus

    mapped, said = [], set()
    for kwargs in options[:2]:
        if kwargs and "device" in kwargs:
            device = device_for_assigned_gpus(kwargs["device"], gpu_ids)
            if device != kwargs["device"] and log is not None and kwargs["device"] not in said:
                said.add(kwargs["device"])
                log(f"--device {kwargs['device']} -> {device}: Ray assigned GPU "
                    f"{', '.join(map(str, gpu_ids))}, visible here as {device}")
            kwargs = {**kwargs, "device": device}
        mapped.append(kwargs)
    return (*mapped, *options[2:])


def _ray_gpu_ids() -> list:
    try:
        import ray
        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - not in a Ray worker (a direct call, a test)
        return []


class Progress:
    """A Ray actor: frames read so far per bag (set, not added, so a retried task does
    not count its frames twice)."""

    def __init__(self):
        self.frames = {}

    def set(self, name: str, frames: int) -> None:
        self.frames[name] = frames

    def total(self) -> int:
        return sum(self.frames.values())


def import_ray():
    try:
        import ray
    except ImportError:
        return None
    return ray


def start_local_ray(num_cpus: int, num_gpus: int = 0, temp_dir: str | None = None,
                    object_store_mb: int = 128):
    """A local Ray instance sized for this run: ``num_cpus`` logical CPUs (so the tasks'
    num_cpus requests decide how many run at once), no dashboard, a small object store
    (results are small dicts), temp files and logs outside the working directory."""
    import logging

    import ray
    # The workers import kp_ros from where this driver found it (a checkout or an install).
    source = str(Path(__file__).resolve().parents[2])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if source not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([source] + paths)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                    object_store_memory=object_store_mb * 1024 * 1024, _temp_dir=temp_dir,
                    logging_level=logging.WARNING, log_to_driver=True)


def wants_cuda(detector_kwargs: dict, matcher_kwargs: dict, gpus_available: int) -> bool:
    devices = {str(kw.get("device", "auto")) for kw in (detector_kwargs, matcher_kwargs)}
    return any(d.startswith("cuda") for d in devices) or ("auto" in devices and gpus_available > 0)


def available_memory_gb() -> float:
    try:
        import psutil  # a dependency of Ray
        return psutil.virtual_memory().available / 2**30
    except ImportError:
        return float("inf")


def plan_resources(args, cuda: bool, gpus: int, cpus: int, bags: int,
                   memory_gb: float = float("inf"), cluster: bool = False) -> tuple[int, int, float]:
    """(tasks at once, torch threads per task, GPUs per task). On a cluster Ray's free
    resources decide how many run; each task asks for --threads CPUs (default 2)."""
    gpus_per_task = (args.gpus_per_task or 1.0) if cuda else 0.0
    if cluster:
        return args.workers or bags, args.threads or 2, gpus_per_task
    if cuda:
        workers = args.workers or max(1, min(gpus, bags))
    else:
        # One task per core by default: measured faster than fewer tasks with more threads
        # (bench/bench_process_bags.py), capped by memory (one model copy per task).
        by_memory = int(memory_gb // GB_PER_TASK) if memory_gb < float("inf") else bags
        workers = args.workers or max(1, min(cpus // (args.threads or 1), bags, by_memory))
    return workers, args.threads or max(1, cpus // workers), gpus_per_task
