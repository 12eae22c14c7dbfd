"""An activation module applied to a fresh tensor without allocating a second one."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def activate_in_place(activation: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    """``activation(states)``, overwriting ``states`` where the module has an in-place form
    (ReLU, LeakyReLU); else the module itself. Only for a tensor nothing else reads: a layer's
    own output. The largest per-frame maps (the transformer MLP's hidden maps, the backbone's
    1/2-resolution maps) are then allocated once instead of twice."""
    if type(activation) is torch.nn.LeakyReLU:
        return F.leaky_relu_(states, activation.negative_slope)
    if type(activation) is torch.nn.ReLU:
        return states.relu_()
    return activation(states)
