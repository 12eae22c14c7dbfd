"""EfficientLoFTR's convolutions re-parameterised for inference: BatchNorms folded away.

transformers runs the RepVGG backbone as trained: each block sums a 3x3 conv + BN, a
1x1 conv + BN and (when the shape allows) an identity BN. In eval mode all three are
linear in the input, so they add up to one 3x3 convolution with a bias, the
"re-parameterisation" the original EfficientLoFTR applies before inference
(``reparameter`` in zju3dv/EfficientLoFTR). The fine fusion's 3x3 conv + BN folds the
same way. The result computes the same function up to float rounding (a few 1e-7
relative in float32, see test/test_eloftr_fold.py) with one convolution instead of
three per block and no BatchNorm passes over the maps.

Pure functions: the loaded model is read, never changed, so it still saves, loads and
trains as transformers' own; the matcher (kp_ros/core/eloftr.py) keeps the folded
modules beside it. The weights are folded in float64 and stored in the model's dtype;
autocast (bf16 / fp16) applies to the folded convolutions as to the original ones.
"""
from __future__ import annotations

import torch
from torch import nn

from kp_ros.core.in_place_activation import activate_in_place


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None,
                    norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``norm(conv(x))`` as one convolution, in float64. ``weight`` is
    the conv's (out, in, k, k) kernel, ``bias`` its bias (None: none)."""
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("a BatchNorm without running statistics cannot be folded")
    scale = norm.running_var.double().add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    if bias is not None:
        shift = shift + bias.double() * scale
    return weight.double() * scale[:, None, None, None], shift


def identity_kernel(channels: int, kernel: int, device) -> torch.Tensor:
    """The (C, C, k, k) float64 kernel of the identity (centre tap 1 on the diagonal)."""
    weight = torch.zeros(channels, channels, kernel, kernel, dtype=torch.float64, device=device)
    weight[torch.arange(channels), torch.arange(channels), kernel // 2, kernel // 2] = 1.0
    return weight


def fold_repvgg_block(block: nn.Module) -> nn.Conv2d:
    """One RepVGG block (conv1: 3x3 + BN, conv2: 1x1 + BN, identity: BN or None) -> the
    3x3 convolution with bias that equals their sum (the activation is applied after)."""
    conv3, conv1 = block.conv1.conv, block.conv2.conv
    if conv3.kernel_size != (3, 3) or conv1.kernel_size != (1, 1) or conv3.groups != 1 or \
            conv1.groups != 1 or conv3.padding != (1, 1) or conv1.padding != (0, 0) or \
            conv3.stride != conv1.stride or conv3.dilation != (1, 1):
        raise ValueError(f"unexpected RepVGG block layout: {conv3} / {conv1}")
    weight, bias = fold_batch_norm(conv3.weight, conv3.bias, block.conv1.norm)
    weight1, bias1 = fold_batch_norm(conv1.weight, conv1.bias, block.conv2.norm)
    weight[:, :, 1:2, 1:2] += weight1  # a 1x1 kernel is a 3x3 one with only the centre tap
    bias = bias + bias1
    if block.identity is not None:
        if conv3.stride != (1, 1) or conv3.in_channels != conv3.out_channels:
            raise ValueError("an identity branch needs stride 1 and as many outputs as inputs")
        weight_id, bias_id = fold_batch_norm(identity_kernel(conv3.in_channels, 3, weight.device),
                                             None, block.identity)
        weight, bias = weight + weight_id, bias + bias_id
    return _conv(conv3, weight, bias)


def _conv(like: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A Conv2d shaped like ``like`` (stride, padding, device, dtype) with the given float64
    weight and bias, stored in ``like``'s dtype."""
    conv = nn.Conv2d(like.in_channels, like.out_channels, like.kernel_size, stride=like.stride,
                     padding=like.padding, dilation=like.dilation, groups=like.groups, bias=True,
                     padding_mode=like.padding_mode, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.to(like.weight.dtype))
        conv.bias.copy_(bias.to(like.weight.dtype))
    conv.requires_grad_(False)
    return conv


class FoldedBackbone(nn.Module):
    """The RepVGG backbone with every block one 3x3 convolution + activation. Same
    call as transformers' ``EfficientLoFTRepVGG``: pixels -> [1/2, 1/4, 1/8] maps."""

    def __init__(self, stages: list[list[tuple[nn.Conv2d, nn.Module]]]):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(*[module for conv, activation in stage for module in (conv, activation)])
            for stage in stages)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        hidden = pixels
        for stage in self.stages:
            modules = list(stage)
            for conv, activation in zip(modules[::2], modules[1::2]):
                hidden = activate_in_place(activation, conv(hidden))
            outputs.append(hidden)
        return outputs[1:]  # as transformers: the first stage's map is not an output


def _eval_only(module: nn.Module, what: str) -> None:
    if module.training:
        raise ValueError(f"fold {what} in eval mode only (training BatchNorms use batch "
                         f"statistics, which a folded convolution cannot): call .eval() first")


def fold_backbone(model: nn.Module) -> FoldedBackbone:
    """The re-parameterised backbone of an ``EfficientLoFTRForKeypointMatching`` (or of
    its ``EfficientLoFTRModel`` / the backbone itself) in eval mode; ``model`` is not changed."""
    backbone = getattr(getattr(model, "efficientloftr", model), "backbone", model)
    _eval_only(backbone, "the backbone")
    return FoldedBackbone([[(fold_repvgg_block(block), block.activation) for block in stage.blocks]
                           for stage in backbone.stages]).eval()


class FoldedFineFusion(nn.Module):
    """transformers' ``EfficientLoFTRFineFusionLayer.forward_pyramid`` with each out-conv
    block's 3x3 conv + BN one convolution with bias (the 1x1 ``out_conv``s, the other 3x3
    and the upsampling are the original modules)."""

    def __init__(self, fusion: nn.Module):
        super().__init__()
        self.out_conv = fusion.out_conv
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"out_conv1": layer.out_conv1,
                           "out_conv2": _conv(layer.out_conv2, *fold_batch_norm(
                               layer.out_conv2.weight, layer.out_conv2.bias, layer.batch_norm)),
                           "activation": layer.activation, "out_conv3": layer.out_conv3})
            for layer in fusion.out_conv_layers)

    def forward_pyramid(self, hidden: torch.Tensor, residuals: list[torch.Tensor]) -> torch.Tensor:
        """Coarse (N, C, h/8, w/8) and the backbone residuals [1/4, 1/2] -> (N, Cf, h, w)."""
        hidden = upsample(self.out_conv(hidden))
        for block, residual in zip(self.blocks, residuals):
            hidden = block["out_conv1"](residual).add_(hidden)
            hidden = activate_in_place(block["activation"], block["out_conv2"](hidden))
            hidden = upsample(block["out_conv3"](hidden))
        return hidden


def upsample(hidden: torch.Tensor) -> torch.Tensor:
    """transformers' fine-fusion upsampling: bilinear x2, align_corners False."""
    return nn.functional.interpolate(hidden, scale_factor=2.0, mode="bilinear", align_corners=False)


def fold_fine_fusion(model: nn.Module) -> FoldedFineFusion:
    """The fine fusion of an ``EfficientLoFTRForKeypointMatching`` (or the
    ``refinement_layer`` itself) with its conv + BN pairs folded; ``model`` is not changed."""
    fusion = getattr(model, "refinement_layer", model)
    _eval_only(fusion, "the fine fusion")
    return FoldedFineFusion(fusion).eval()
