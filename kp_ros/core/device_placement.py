"""Where a model's weights and inputs live on the device, decided once from (device, precision).

Three choices, each a plain decision (``placement``) that runs and is tested on any
machine, and an ``apply_*`` that does it:
  - ``weights_dtype``: under fp16 / bf16 autocast on CUDA the convolution and linear
    weights are cast to that dtype once at load, not by autocast on every frame (autocast
    casts every float32 weight of a low-precision op on each call; its cast cache lives only
    for one autocast region). The results are the same bits: autocast leaves an
    already-low-precision weight alone and casts activations as before; norms, buffers and
    the float32 stages stay float32.
  - ``memory_format``: channels_last for the convolution backbone under fp16 / bf16 on
    CUDA (tensor-core convolutions are NHWC; an NCHW input makes cuDNN transpose around
    every convolution), and on the CPU for the folded backbone in any precision (oneDNN
    reorders an NCHW map around each convolution: its NHWC kernels ran the backbone's 3x3
    convolutions 3-11 % faster in fp32, and the bf16 step took 0.77x the time). CUDA fp32
    and transformers' own (unfolded) modules on the CPU keep the default layout, so the
    unfolded CPU fp32 results stay the reference's bits.
  - ``pin_memory`` / ``non_blocking``: a frame reaches the GPU through pinned memory,
    asynchronously (a pageable copy blocks the host until the device has caught up);
    nothing of the kind on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOW_PRECISION_LAYERS = (torch.nn.Conv2d, torch.nn.Linear)  # the layers autocast runs in fp16 / bf16


@dataclass(frozen=True)
class Placement:
    weights_dtype: torch.dtype | None  # cast LOW_PRECISION_LAYERS' parameters at load; None: leave them
    memory_format: torch.memory_format  # of the convolution backbone and its input
    pin_memory: bool                   # host buffers of uploads pinned
    non_blocking: bool                 # uploads asynchronous


def placement(device, precision: str = "fp32", folded: bool = True) -> Placement:
    """The decision for ``device`` (a torch.device or a string: 'cpu', 'cuda', 'cuda:1'),
    a resolved precision name (fp32 | bf16 | fp16) and whether the backbone is the folded
    one (kp_ros/core/eloftr_fold.py) or transformers' own."""
    cuda = torch.device(device).type == "cuda"
    reduced = cuda and precision in ("fp16", "bf16")
    channels_last = reduced or (not cuda and folded)
    return Placement(weights_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[precision] if reduced else None,
                     memory_format=torch.channels_last if channels_last else torch.contiguous_format,
                     pin_memory=cuda, non_blocking=cuda)


def apply_weights_dtype(module: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Cast the parameters of every convolution / linear layer in ``module`` to ``dtype``
    (None: nothing); the number of layers cast. Norm layers and buffers keep float32."""
    if dtype is None:
        return 0
    count = 0
    for layer in module.modules():
        if isinstance(layer, LOW_PRECISION_LAYERS):
            layer.to(dtype)
            count += 1
    return count


def apply_memory_format(module: torch.nn.Module, memory_format: torch.memory_format) -> None:
    """The 4-D parameters of ``module`` in ``memory_format`` (a no-op for the default)."""
    if memory_format != torch.contiguous_format:
        module.to(memory_format=memory_format)


def to_device(tensor: torch.Tensor, device, plan: Placement | None = None) -> torch.Tensor:
    """A host tensor on ``device`` as ``plan`` (default: ``placement(device)``) says: through
    pinned memory and non-blocking on CUDA (the caching host allocator keeps the pinned
    buffer until the copy has run), a plain ``.to`` elsewhere."""
    plan = plan or placement(device)
    if plan.pin_memory:
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=plan.non_blocking)
