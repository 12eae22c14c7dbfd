"""Which floating-point precision a model runs in, and whether this machine has it natively.

``precision``: ``fp32`` | ``bf16`` | ``fp16`` | ``auto`` (fp16 on a CUDA GPU with tensor
cores, i.e. compute capability >= 7.0; fp32 on older GPUs and on CPU: bf16 on a CPU is
opt-in, it changes results by bf16 rounding). ``fp16`` is CUDA-only (CPU half
convolutions are slow and inexact); on CPU it falls back to fp32 with a warning. ``bf16``
runs on CPU and CUDA; a CPU without native bf16 (AVX512-BF16 or AMX) or a GPU below
compute capability 8.0 (T4, V100: no bf16 tensor cores) emulates it and is slower, so
that case gets a loud warning, not a refusal (the results are the same bf16 results,
which is what the agreement tests check on such machines). The GPU is the one asked
for (``cuda:N``), not the current device.

TF32 is set explicitly, per precision, around every model call (``Precision.math_mode``,
also entered by ``Precision.autocast``): off for fp32, so fp32 on an Ampere+ GPU computes
what the CPU computes (torch's default ``cudnn.allow_tf32 = True`` would round every
convolution's inputs to 10 mantissa bits); on for bf16 / fp16, whose float32 stages then
round to TF32's 10 bits, no coarser than the reduced stages (bf16 7, fp16 10 bits).

Which stages run in lower precision is each model's choice (superpoint.py, eloftr.py);
both keep softmax normalisation, NMS, the sub-pixel expectation and the coordinate
mapping in float32.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch

from kp_ros.core.params import PRECISION_CHOICES

PRECISIONS = PRECISION_CHOICES  # the spec's list (kp_ros/core/params.py), not a copy
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionWarning(UserWarning, RuntimeWarning):
    """A precision that will not run as asked (fallback) or will run slowly (emulated)."""


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple[bool, str]:
    """(native, what): whether this CPU computes bf16 in hardware, and a short description
    for the start-up line. From torch's cpuinfo (``torch.cpu.get_capabilities``)."""
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # noqa: BLE001 - older torch: no capability query, assume none
        caps = {}
    return bf16_support_from_flags(caps, str(caps.get("cpu_name", "CPU")).strip() or "CPU")


def bf16_support_from_flags(caps: dict, cpu_name: str = "CPU") -> tuple[bool, str]:
    """The decision of ``cpu_bf16_support`` for given capability flags (testable)."""
    native = [name for key, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
              if caps.get(key)]
    if native:
        return True, f"native bf16 on {cpu_name} ({', '.join(native)})"
    return False, f"no native bf16 on {cpu_name} (no AVX512-BF16 / AMX): emulated"


@dataclass(frozen=True)
class Precision:
    """The resolved precision: ``name`` in fp32 | bf16 | fp16, its torch ``dtype``,
    ``note`` for the start-up line, ``warning`` ('' when none) said once at start."""
    name: str
    dtype: torch.dtype
    note: str
    warning: str = ""

    @property
    def reduced(self) -> bool:
        return self.dtype != torch.float32

    @property
    def allow_tf32(self) -> bool:
        """TF32 for float32 convolutions and matmuls on CUDA: off for fp32 (CPU parity)."""
        return self.reduced

    def math_mode(self, device: torch.device):
        """A context with TF32 set for this precision on CUDA (restored after); nothing
        on CPU. Around every model call: the flags are process-wide, and another model
        in the same process may run another precision."""
        return tf32_mode(self.allow_tf32) if device.type == "cuda" else contextlib.nullcontext()

    @contextlib.contextmanager
    def autocast(self, device: torch.device):
        """An autocast context for the low-precision stages (disabled for fp32), with
        ``math_mode`` for the float32 ops in it."""
        with self.math_mode(device), torch.autocast(device.type, dtype=self.dtype,
                                                    enabled=self.reduced):
            yield


@contextlib.contextmanager
def tf32_mode(allow: bool):
    """cuDNN convolutions and cuBLAS matmuls in TF32 (``allow``) or full float32, restored
    afterwards. torch's legacy flags, the ones every torch >= 1.7 reads; its newer
    ``fp32_precision`` API must not be mixed with them (reading then raises)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    try:
        saved = (cudnn.allow_tf32, matmul.allow_tf32)
    except RuntimeError:  # the process mixed in the new API: set ours, restore nothing
        saved = None
    cudnn.allow_tf32 = matmul.allow_tf32 = bool(allow)
    try:
        yield
    finally:
        if saved is not None:
            cudnn.allow_tf32, matmul.allow_tf32 = saved


def resolve_precision(precision: str, device: torch.device, fp16: bool = False) -> Precision:
    """``precision`` (or the deprecated ``fp16`` flag) on ``device`` -> a Precision, or a
    ValueError for an unknown name or a contradiction. ``fp16=True`` means
    ``precision='fp16'`` when precision is left at fp32 or auto."""
    name = str(precision).strip().lower()
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    notes = []
    if fp16:
        if name not in ("fp32", "auto", "fp16"):
            raise ValueError(f"fp16: true (deprecated) contradicts precision: {name}; "
                             f"set only precision")
        name = "fp16"
        notes.append("fp16: true is deprecated, use precision: fp16")
    capability = cuda_capability(device) if device.type == "cuda" else None
    if name == "auto":
        name = "fp16" if capability is not None and capability >= TENSOR_CORES else "fp32"
        notes.append(f"auto: {_auto_reason(device, capability)}")
    warning = ""
    if device.type == "cpu" and name == "fp16":
        warning = ("precision fp16 is only used on CUDA (CPU half convolutions are slow and "
                   "inexact); running fp32 on cpu. Use precision: bf16 for reduced precision "
                   "on a CPU with AVX512-BF16 / AMX")
        name = "fp32"
    elif device.type == "cpu" and name == "bf16":
        native, what = cpu_bf16_support()
        notes.append(what)
        if not native:
            warning = ("precision bf16 on a CPU without native bf16 (no AVX512-BF16 / AMX): "
                       "it is emulated and SLOWER than fp32 here (results are bf16's); "
                       "use precision: fp32 on this machine")
    elif device.type == "cuda" and name == "bf16" and capability < BF16_TENSOR_CORES:
        warning = (f"precision bf16 on {_gpu(device, capability)}: no bf16 tensor cores below "
                   f"compute capability 8.0, it is emulated and SLOW; use precision: fp16")
    elif device.type == "cuda" and name == "fp16" and capability < TENSOR_CORES:
        warning = (f"precision fp16 on {_gpu(device, capability)}: no tensor cores below compute "
                   f"capability 7.0, fp16 may be no faster than fp32; use precision: fp32")
    note = name + (f" ({'; '.join(notes)})" if notes else "")
    return Precision(name, DTYPES[name], note, warning)


TENSOR_CORES = (7, 0)       # Volta: fp16 tensor cores
BF16_TENSOR_CORES = (8, 0)  # Ampere: bf16 tensor cores (torch.cuda.is_bf16_supported()
# counts emulation as support by default, so it is True on a T4 or V100, and it asks the
# current device, not the one a model runs on)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of the GPU ``device`` names (cuda = the current one)."""
    return tuple(torch.cuda.get_device_capability(device))


def _gpu(device: torch.device, capability) -> str:
    return f"{torch.cuda.get_device_name(device)} (sm {capability[0]}.{capability[1]})"


def _auto_reason(device: torch.device, capability) -> str:
    if capability is None:
        return f"fp32 on {device.type}"
    if capability >= TENSOR_CORES:
        return f"fp16 on {_gpu(device, capability)}, tensor cores"
    return f"fp32 on {_gpu(device, capability)}, no tensor cores"


def warn_once(precision: Precision, stacklevel: int = 3) -> None:
    if precision.warning:
        warnings.warn(precision.warning, PrecisionWarning, stacklevel=stacklevel)


# --- agreement between two runs of the same model (tests and benchmark) ---------------

def keypoint_agreement(reference: dict, other: dict, radius: float = 1.0) -> dict:
    """How well ``other`` (detect() output) reproduces ``reference``: 'recall' = share of
    reference keypoints with an ``other`` keypoint within ``radius`` px, 'precision' the
    reverse, and the descriptor cosine of those nearest pairs ('cosine_median', 'cosine_p05')."""
    reference, other = _tensors(reference), _tensors(other)
    kp0, kp1 = reference["keypoints"].float(), other["keypoints"].float()
    if len(kp0) == 0 or len(kp1) == 0:
        empty = float(len(kp0) == len(kp1))
        return {"recall": empty, "precision": empty, "cosine_median": float("nan"),
                "cosine_p05": float("nan"), "count": (len(kp0), len(kp1))}
    distance = torch.cdist(kp0, kp1)
    nearest0, index0 = distance.min(1)
    close = nearest0 <= radius
    cosine = (reference["descriptors"][close] * other["descriptors"][index0[close]]).sum(1)
    return {"recall": close.float().mean().item(),
            "precision": (distance.min(0).values <= radius).float().mean().item(),
            "cosine_median": cosine.median().item() if len(cosine) else float("nan"),
            "cosine_p05": cosine.quantile(0.05).item() if len(cosine) else float("nan"),
            "count": (len(kp0), len(kp1))}


def match_agreement(reference: dict, other: dict) -> dict:
    """Mutual-NN set overlap of two match results (``match_pair`` output), as the share of
    reference matches whose coarse cell pair (keypoint positions within 4 px on both sides,
    i.e. the same cells) ``other`` also has ('recall'), the reverse ('precision'), the
    intersection over union, and the position differences of the shared matches in px
    ('position_median', 'position_max', over both frames; 'moved_over_1px' the share of
    those differences above 1 px)."""
    reference, other = _tensors(reference), _tensors(other)
    a0, a1 = reference["keypoints0"].float(), reference["keypoints1"].float()
    b0, b1 = other["keypoints0"].float(), other["keypoints1"].float()
    if len(a0) == 0 or len(b0) == 0:
        same = float(len(a0) == len(b0))
        return {"recall": same, "precision": same, "iou": same, "position_median": float("nan"),
                "position_max": float("nan"), "moved_over_1px": float("nan"), "count": (len(a0), len(b0))}
    # Refinement moves a point at most ~4 px from its cell's coarse point, cells are 8 px
    # apart: a pair within 4 px on both sides is the same cell pair.
    distance = torch.maximum(torch.cdist(a0, b0), torch.cdist(a1, b1))
    nearest, index = distance.min(1)
    shared = nearest < 4.0
    position = torch.cat([(a0[shared] - b0[index[shared]]).norm(dim=1),
                          (a1[shared] - b1[index[shared]]).norm(dim=1)])
    count = int(shared.sum())
    return {"recall": count / len(a0), "precision": float((distance.min(0).values < 4.0).float().mean()),
            "iou": count / (len(a0) + len(b0) - count),
            "position_median": position.median().item() if count else float("nan"),
            "position_max": position.max().item() if count else float("nan"),
            "moved_over_1px": (position > 1.0).float().mean().item() if count else float("nan"),
            "count": (len(a0), len(b0))}


def _tensors(result: dict) -> dict[str, torch.Tensor]:
    """A core result (numpy arrays) as tensors, for cdist and friends (no copy)."""
    return {key: torch.as_tensor(value) for key, value in result.items()}
