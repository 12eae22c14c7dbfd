"""How the local feature transformer's MLPs run: over each cell of the coarse maps,
fc1 (2C -> I), activation, fc2 (I -> C), LayerNorm, as transformers' EfficientLoFTRMLP.

transformers hands each MLP a permuted (B, H, W, 2C) view of an NCHW tensor. Two forms,
the same function up to float rounding, installed on the matcher's own model instance
(not saved with it) by ``install_mlp_forward``:
  - ``linear``: the input made contiguous, then the Linear layers. (Under bf16 / fp16
    autocast a permuted input turns each Linear into a batched product with the weight
    expanded and copied per row of cells, which costs more than the product itself.)
  - ``pointwise_conv``: the input as an NCHW map in channels_last (a view when it already
    is: kp_ros/core/eloftr_transformer.py), the Linear layers as 1x1 convolutions on it,
    oneDNN's kernels instead of the BLAS sgemm behind ``nn.Linear``
    (kp_ros/core/pointwise_products.py decides where). CUDA keeps cuBLAS.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from kp_ros.core.in_place_activation import activate_in_place
from kp_ros.core.pointwise_products import conv_products

MLP_CLASS = "EfficientLoFTRMLP"


def mlp_form(device) -> str:
    """'pointwise_conv' where products run as 1x1 convolutions (a CPU with oneDNN), else 'linear'."""
    return "pointwise_conv" if conv_products(device) else "linear"


def install_mlp_forward(model: torch.nn.Module, form: str) -> int:
    """Give every transformer MLP of ``model`` the ``form`` forward; the number changed."""
    forward = {"linear": _linear_forward, "pointwise_conv": _pointwise_conv_forward}[form]
    count = 0
    for module in model.modules():
        if type(module).__name__ == MLP_CLASS:
            module.forward = types.MethodType(forward, module)
            count += 1
    return count


def _linear_forward(mlp, hidden_states: torch.Tensor) -> torch.Tensor:
    hidden_states = mlp.fc2(activate_in_place(mlp.activation, mlp.fc1(hidden_states.contiguous())))
    return mlp.layer_norm(hidden_states)


def _pointwise_conv_forward(mlp, hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 2C) -> (B, H, W, C), the Linear layers as 1x1 convolutions in channels_last."""
    maps = hidden_states.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    maps = F.conv2d(maps, mlp.fc1.weight[:, :, None, None], mlp.fc1.bias)
    maps = F.conv2d(activate_in_place(mlp.activation, maps), mlp.fc2.weight[:, :, None, None], mlp.fc2.bias)
    return mlp.layer_norm(maps.permute(0, 2, 3, 1))  # channels_last: a contiguous (B, H, W, C)
