"""Which exceptions from inference leave the device unusable for the rest of the process.

Most failures cost one frame: a bad input, a CUDA out-of-memory (the allocator frees the
frame's tensors and the next frame runs). A *sticky* CUDA error does not: after an
illegal memory access or a device-side assert the CUDA context is corrupted and every
later kernel launch, copy or synchronisation fails with the same error until the process
exits. A node that counted it as one rejected frame would reject every frame after it and
never exit, so ``respawn`` would never restart it; these errors must end the process
instead (exit code ``EXIT_DEVICE_FAILED``).

``is_sticky_device_error`` decides from the exception alone (type and text, CUDA's error
strings); for a CUDA error whose text is not in the list, ``device_still_works`` probes
the device with one tiny kernel and a synchronisation.
"""
from __future__ import annotations

from typing import Callable

EXIT_DEVICE_FAILED = 3  # not 1 (a start-up error: bad weights or parameters, see run_node)

# CUDA runtime/driver error strings (cudaGetErrorString) of the errors that corrupt the
# context: cudaErrorIllegalAddress, cudaErrorAssert, cudaErrorLaunchFailure,
# cudaErrorHardwareStackError, cudaErrorIllegalInstruction, cudaErrorMisalignedAddress,
# cudaErrorInvalidAddressSpace, cudaErrorInvalidPc, cudaErrorLaunchTimeout,
# cudaErrorECCUncorrectable, cudaErrorUnknown; plus cuBLAS/cuDNN's execution failures (what
# they report when a kernel of theirs hit one of the above) and a lost device.
STICKY_MESSAGES = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "hardware stack error",
    "illegal instruction",
    "misaligned address",
    "invalid address space",
    "invalid program counter",
    "the launch timed out",
    "uncorrectable ecc error",
    "cuda error: unknown error",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "cudnn_status_internal_error",
    "cuda driver error",
    "device has fallen off the bus",
    "gpu is lost",
)
# Text that marks an exception as a CUDA error at all (then probed when not listed above).
CUDA_MARKERS = ("cuda error", "cuda runtime error", "cublas", "cudnn", "cuda driver", "nccl")


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory: recoverable (the frame's tensors are freed), not sticky."""
    try:
        import torch
        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover - torch always has it here
        pass
    return "out of memory" in str(exc).lower()


def looks_like_cuda_error(exc: BaseException) -> bool:
    """An exception raised by CUDA, cuBLAS or cuDNN (by type or text), OOM excluded."""
    if not isinstance(exc, RuntimeError) or is_out_of_memory(exc):
        return False
    text = str(exc).lower()
    return _is_accelerator_error(exc) or any(marker in text for marker in CUDA_MARKERS)


def is_sticky_device_error(exc: BaseException,
                           device_works: Callable[[], bool] | None = None) -> bool:
    """Whether ``exc`` (raised while processing a frame) leaves the device unusable, so
    the process must exit. Known sticky CUDA errors by their text; any other CUDA error
    when ``device_works()`` (a probe, e.g. ``device_still_works``) says the device fails
    now too. Everything else (bad input, OOM, Python errors) is one lost frame."""
    if not looks_like_cuda_error(exc):
        return False
    text = str(exc).lower()
    if any(message in text for message in STICKY_MESSAGES):
        return True
    return device_works is not None and not device_works()


def device_still_works(device) -> bool:
    """One tiny kernel, a synchronisation and a copy back on ``device``: False when the
    CUDA context is broken (every call then raises the sticky error again)."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return True
    try:
        probe = torch.ones(1, device=device) + 1
        torch.cuda.synchronize(device)
        return float(probe.cpu()[0]) == 2.0
    except Exception:  # noqa: BLE001 - whatever the broken context raises
        return False


def _is_accelerator_error(exc: BaseException) -> bool:
    import torch
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    return accelerator_error is not None and isinstance(exc, accelerator_error)
