"""How the local feature transformer's MLPs run: over each cell of the coarse maps,
fc1 (2C -> I), activation, fc2 (I -> C), LayerNorm, as transformers' EfficientLoFTRMLP.

Two forms of the products, the same function up to float rounding (``mlp_form`` decides):
  - ``linear``: the Linear layers on contiguous (..., features) rows.
  - ``pointwise_conv``: the Linear layers as 1x1 convolutions of channels_last maps,
    oneDNN's kernels instead of the BLAS sgemm behind ``nn.Linear``
    (kp_ros/core/pointwise_products.py decides where). CUDA keeps cuBLAS.

Two entry points:
  - ``split_input_mlp``: the MLP of [maps, upsample(attended)] for the channels_last
    transformer (kp_ros/core/eloftr_transformer.py) without that concatenation, fc1's
    attended half on the aggregated cells before the upsampling.
  - ``install_mlp_forward``: transformers' own modules (the unfolded matcher) get the
    ``linear`` forward on their permuted (B, H, W, 2C) input, made contiguous first (under
    bf16 / fp16 autocast a permuted input turns each Linear into a batched product with the
    weight expanded and copied per row of cells, which costs more than the product itself);
    installed on the matcher's own model instance, not saved with it.
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


def install_mlp_forward(model: torch.nn.Module) -> int:
    """Give every transformer MLP of ``model`` the ``linear`` forward; the number changed."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == MLP_CLASS:
            module.forward = types.MethodType(_linear_forward, module)
            count += 1
    return count


def split_input_mlp(mlp, maps: torch.Tensor, attended: torch.Tensor, scale: int, form: str) -> torch.Tensor:
    """transformers' ``mlp(cat([maps, upsample(attended)], 1).permute(0, 2, 3, 1))``, (B, H, W, C),
    from channels_last maps (B, C, H, W) and attended (B, C, H / scale, W / scale).

    fc1 splits along its input into the maps' half and the attended half; the attended half
    (and fc1's bias) runs before the bilinear upsampling, on scale^2 times fewer cells: it
    mixes channels at each cell, the upsampling mixes cells per channel with weights that
    sum to one, both linear, so they commute. That is a quarter of the MLP's products and
    no concatenated (B, 2C, H, W) input, the same function up to float rounding
    (test/test_eloftr_mlp.py)."""
    channels = maps.shape[1]
    product = _conv_product if form == "pointwise_conv" else _linear_product
    hidden = F.interpolate(product(attended, mlp.fc1.weight[:, channels:], mlp.fc1.bias), scale_factor=scale,
                           mode="bilinear", align_corners=False)
    hidden = hidden.add_(product(maps, mlp.fc1.weight[:, :channels], None))
    hidden = product(activate_in_place(mlp.activation, hidden), mlp.fc2.weight, mlp.fc2.bias)
    return mlp.layer_norm(hidden.permute(0, 2, 3, 1))  # channels_last: a contiguous (B, H, W, C)


def _conv_product(maps: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A Linear layer's weight (out, in) on channels_last maps (B, in, H, W), as a 1x1 convolution."""
    return F.conv2d(maps, weight.contiguous()[:, :, None, None], bias)


def _linear_product(maps: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same with F.linear on the maps' cells (contiguous rows in channels_last)."""
    return F.linear(maps.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)


def _linear_forward(mlp, hidden_states: torch.Tensor) -> torch.Tensor:
    hidden_states = mlp.fc2(activate_in_place(mlp.activation, mlp.fc1(hidden_states.contiguous())))
    return mlp.layer_norm(hidden_states)
