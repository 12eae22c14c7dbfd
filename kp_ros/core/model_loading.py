"""Resolve devices and load transformers models by hub id or local directory, failing fast."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from kp_ros.core.cpu_heap import retain_freed_memory


class ModelUnavailableError(RuntimeError):
    """The weights are neither in a local directory, nor cached, nor downloadable."""


def resolve_device(name: str) -> torch.device:
    """Map 'auto' | 'cpu' | 'cuda' | 'cuda:N' to a usable torch.device, or raise ValueError."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} requested but CUDA is not available to this torch "
                f"({torch.__version__}); install a CUDA build of torch or use device:=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_for_assigned_gpus(name: str, assigned_gpus) -> str:
    """The device string to use in a process that a scheduler gave its own GPU(s).

    Ray (a GPU task), Slurm and similar set CUDA_VISIBLE_DEVICES to the assigned GPU(s),
    so the process sees them as cuda:0.. whatever their index on the machine: a
    ``cuda:N`` chosen on the driver (N >= 1) does not exist there ("only 1 CUDA
    device(s)"). With ``assigned_gpus`` (e.g. ``ray.get_gpu_ids()``) non-empty every
    ``cuda`` / ``cuda:N`` becomes ``cuda`` (the first assigned GPU); anything else, or no
    assignment, is returned unchanged."""
    text = str(name).strip()
    if assigned_gpus and text.lower().startswith("cuda"):
        return "cuda"
    return text


def _looks_like_path(model: str) -> bool:
    return model.startswith((os.sep, ".", "~")) or model.count("/") != 1


def _hub_reachable(timeout_s: float = 2.0) -> bool:
    """One quick TCP connect to the hub, so an offline machine fails in seconds, not ~23 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        return str(HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return "~/.cache/huggingface/hub"


def _unavailable(model: str, why: str, is_path: bool = False) -> ModelUnavailableError:
    if is_path:
        return ModelUnavailableError(
            f"cannot load model {model!r}: {why}. Pass a directory written by save_pretrained "
            f"or `hf download <hub id> --local-dir DIR`, or a hub id such as "
            f"magic-leap-community/superpoint / zju-community/efficientloftr.")
    return ModelUnavailableError(
        f"cannot load model {model!r}: {why}. Looked in: the Hugging Face cache "
        f"{_hub_cache_dir()} and the hub. To provide the weights, on a connected machine run "
        f"`hf download {model} --local-dir DIR` (or `huggingface-cli download ...`), copy DIR "
        f"here and pass model:=DIR; or pre-fill the cache (HF_HOME) by loading it once online.")


def load_pretrained(loader, model: str, **kwargs):
    """``loader.from_pretrained(model)`` that takes a local directory or a hub id.

    A hub id is looked up in the local cache first; the network is tried only when
    the hub answers at all, and every failure becomes one ModelUnavailableError.
    A process that loads a model runs it per frame: from now on its freed per-frame
    tensors stay in the heap (kp_ros/core/cpu_heap.py; KP_ROS_RETAIN_HEAP=0: not).
    """
    from transformers.utils import logging as hf_logging
    retain_freed_memory()
    hf_logging.disable_progress_bar()  # one log line per node start, not a progress bar
    model = str(model).strip()
    path = Path(model).expanduser()
    if path.is_dir():
        try:
            return loader.from_pretrained(str(path), **kwargs)
        except Exception as err:  # noqa: BLE001 - corrupt or mismatched weights raise anything
            # (OSError, ValueError, SafetensorError, RuntimeError on a size mismatch, TypeError
            # on a non-dict config): one clear error for every caller, not a traceback.
            raise ModelUnavailableError(
                f"cannot load model from directory {str(path)!r}: {type(err).__name__}: {err}. "
                f"It must hold the files of save_pretrained (config.json and "
                f"model.safetensors) of this model type.") from err
    if _looks_like_path(model):
        raise _unavailable(model, "no such directory", is_path=True)
    try:
        return loader.from_pretrained(model, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not _hub_reachable():
        raise _unavailable(model, "not in the local cache and the hub is unreachable (offline?)")
    try:
        return loader.from_pretrained(model, **kwargs)
    except OSError as err:
        raise _unavailable(model, f"download failed ({err})") from err
