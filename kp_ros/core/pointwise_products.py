"""Large float32 matrix products on the CPU as 1x1 convolutions (oneDNN) instead of BLAS.

PyTorch's CPU ``mm`` / ``nn.Linear`` call the BLAS it was built with (MKL on x86), whose
sgemm ran at 0.7-0.75x oneDNN's 1x1 convolution on an AMD EPYC (2 cores: 131-141 vs
158-189 GFLOP/s for the EfficientLoFTR transformer's and coarse matching's products; on
Intel, MKL's native ground, the two are close). A product whose one operand is a set of
"pixels" (rows of C features, contiguous) is a 1x1 convolution of that set, laid out as
a channels_last (1, C, 1, N) map, with the other operand as its (M, C, 1, 1) weight; the
result comes back channels_last, i.e. (N, M) row-major. One decision for every caller:
``conv_products(device)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_products(device) -> bool:
    """Whether products over feature maps run as 1x1 convolutions: on a CPU with oneDNN."""
    return torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()


def pixels_times_rows(pixels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``pixels @ rows.T`` for pixels (N, C) and rows (M, C), both contiguous: (N, M)
    contiguous, as a 1x1 convolution (see the module's docstring)."""
    count, channels = pixels.shape
    maps = pixels.reshape(1, 1, count, channels).permute(0, 3, 1, 2)  # channels_last view
    product = F.conv2d(maps, rows.reshape(rows.shape[0], channels, 1, 1))
    return product.permute(0, 2, 3, 1).reshape(count, rows.shape[0])
