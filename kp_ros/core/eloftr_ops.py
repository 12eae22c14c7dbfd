"""Tensor operations of EfficientLoFTR's matching steps: cell indexing, border cells, fine
windows and the two-stage fine refinement. Pure functions on torch tensors, no model; the
matcher (kp_ros/core/eloftr.py) calls them, test/test_eloftr.py checks them against the
reference's own unfold / dual softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cell_xy(ids: torch.Tensor, width: int) -> torch.Tensor:
    """Flat coarse-cell indices -> (M, 2) integer (x, y) grid positions."""
    return torch.stack([ids % width, ids // width], dim=-1)


def inner_cells(height: int, width: int, border: int, device) -> torch.Tensor:
    """(h*w,) bool: cells at least ``border`` cells away from the grid's edge."""
    keep = torch.zeros(height, width, dtype=torch.bool, device=device)
    if border <= 0:
        keep[:] = True
    elif height > 2 * border and width > 2 * border:
        keep[border:-border, border:-border] = True
    return keep.flatten()


def cut_windows(fine: torch.Tensor, ids: torch.Tensor, coarse_width: int, stride: int,
                kernel: int, padding: int) -> torch.Tensor:
    """The windows ``F.unfold(fine, kernel, stride, padding)`` would give for cells ``ids``,
    as (M, kernel*kernel, C), without unfolding the whole map."""
    if padding:
        fine = F.pad(fine, (padding, padding, padding, padding))
    xy = cell_xy(ids, coarse_width) * stride
    offsets = torch.arange(kernel, device=fine.device)
    rows = (xy[:, 1, None] + offsets)[:, :, None]  # (M, k, 1)
    cols = (xy[:, 0, None] + offsets)[:, None, :]  # (M, 1, k)
    windows = fine[:, rows, cols]  # (C, M, k, k)
    return windows.permute(1, 2, 3, 0).reshape(len(ids), kernel * kernel, -1)


def fine_matching(windows0: torch.Tensor, windows1: torch.Tensor, points0: torch.Tensor,
                  points1: torch.Tensor, fine_scale: float, slice_dim: int,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EfficientLoFTR's two-stage refinement, as in the original ``FineMatching``.

    windows0 (M, W*W, C): fine features of each older cell; windows1 (M, (W+2)^2, C): of
    each newer cell with a 1-pixel margin; points0/1 (M, 2): the cells' coarse points.
    Stage 1 (first C - slice_dim channels): dual softmax over both windows, the best pixel
    pair moves both points. Stage 2 (last slice_dim channels): a 3x3 soft-argmax around
    the newer pixel moves points1 by up to one pixel.
    (transformers 5.23 takes the dual softmax over (matches, window0) instead of the two
    windows and gathers the stage-1 offsets along the match axis, so every match gets the
    offset of window pixel 0; both fixed here.)
    """
    num, window_area, channels = windows0.shape
    size = int(round(window_area ** 0.5))
    # Stage 1: pixel-level.
    features0 = windows0[..., :-slice_dim] / channels ** 0.5
    features1 = windows1[..., :-slice_dim] / channels ** 0.5
    similarity = features0 @ features1.transpose(1, 2)  # (M, W*W, (W+2)^2)
    confidence = F.softmax(similarity, 1) * F.softmax(similarity, 2)
    confidence = confidence.reshape(num, window_area, size + 2, size + 2)[..., 1:-1, 1:-1]
    best = confidence.reshape(num, -1).argmax(-1)
    index0, index1 = best // window_area, best % window_area
    offsets = window_offsets(size, windows0.device)  # (W*W, 2) x, y around the coarse point
    points0 = points0 + offsets[index0] * fine_scale
    points1 = points1 + offsets[index1] * fine_scale
    # Stage 2: sub-pixel, in the newer frame only. As in the original (and its training),
    # the 3x3 patch is indexed with index1's inner-window row/col directly in the (W+2)-wide
    # grid, i.e. centred one pixel up-left of the stage-1 pixel; -1 wraps around.
    row, col = index1 // size, index1 % size
    step = torch.arange(-1, 2, device=windows0.device)
    rows = (row[:, None, None] + step[None, :, None]) % (size + 2)  # (M, 3, 1)
    cols = (col[:, None, None] + step[None, None, :]) % (size + 2)  # (M, 1, 3)
    patch = windows1.reshape(num, size + 2, size + 2, channels)[
        torch.arange(num, device=windows0.device)[:, None, None], rows, cols][..., -slice_dim:]
    anchor = windows0[torch.arange(num, device=windows0.device), index0][:, -slice_dim:]
    logits = torch.einsum("mabc,mc->mab", patch / slice_dim ** 0.5, anchor).reshape(num, 9)
    heatmap = F.softmax(logits / temperature, -1).reshape(num, 3, 3)
    grid = torch.tensor([-1.0, 0.0, 1.0], device=windows0.device, dtype=heatmap.dtype)
    expected = torch.stack([(heatmap.sum(1) * grid).sum(-1), (heatmap.sum(2) * grid).sum(-1)], -1)
    return points0, points1 + expected * fine_scale


def window_offsets(size: int, device) -> torch.Tensor:
    """(size*size, 2) (x, y) of each window pixel relative to the window's coarse point:
    -size/2 + 0.5 ... size/2 - 0.5 (EfficientLoFTR's convention)."""
    axis = torch.arange(size, device=device, dtype=torch.float32) - size // 2 + 0.5
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1)
