"""Tensor operations of EfficientLoFTR's matching steps: cell indexing, border cells, the
coarse mutual nearest neighbours in linear memory, fine windows and the two-stage fine
refinement. Pure functions on torch tensors, no model; the matcher (kp_ros/core/eloftr.py)
calls them, test/test_eloftr.py and test/test_eloftr_linear.py check them against the
reference's own unfold / dual softmax.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kp_ros.core.pointwise_products import conv_products, pixels_times_rows


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


# -- coarse matching in linear memory -------------------------------------------------------

# Bytes of one (rows x L1) float32 block of the similarity matrix in the blocked matching;
# each block has two (the similarities and their exponentials). On CPU that is sized to stay in a typical last-level cache, where the
# elementwise passes over a block cost much less than from memory (1280x720: ~3x faster
# than 256 MiB blocks; 16 MiB blocks were slower again, the matrix product then rereading
# the newer frame's features too often). On CUDA: a share of the free memory.
CPU_CHUNK_BYTES = 32 * 2 ** 20
CUDA_FREE_SHARE = 0.125
# The blocks' exponentials are exp2(x * log2(e)): torch's CPU exp takes a slow path for
# arguments whose result underflows (about 10x the time per element, and most of a
# similarity block is far below its row's or column's maximum), and even on normal
# arguments costs about twice exp2, which runs at memory speed and has no such path.
# x = S - max is formed first, exactly 0 at the maximum, so each sum keeps its term of
# 1; the multiply rounds x by half an ulp (confidences within 4e-6 relative of exp's on
# unit-norm features, as close as two blockings of the product are to each other).
LOG2_E = 1.4426950408889634


def whole_matrix_fits(rows: int, columns: int, device, chunk_bytes: int | None = None) -> bool:
    """Whether the matcher takes the whole (rows, columns) matrix at once (the reference's
    two softmaxes): when one block (``chunk_rows``) holds it. Larger, the blocked passes
    are faster on CPU too (640x480: ~0.7x the whole matrix's time, its 92 MB matrix no
    longer read from memory by each elementwise pass)."""
    return chunk_rows(rows, columns, device, chunk_bytes) >= rows


def chunk_rows(rows: int, columns: int, device, chunk_bytes: int | None = None) -> int:
    """Rows of the similarity matrix per block: ``chunk_bytes`` (default: CPU_CHUNK_BYTES
    on CPU, CUDA_FREE_SHARE of the free memory on CUDA) of float32 rows, at least one."""
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES
        if torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            chunk_bytes = int(free * CUDA_FREE_SHARE)
    return max(1, min(rows, int(chunk_bytes) // (4 * max(columns, 1))))


def mutual_nearest(features0: torch.Tensor, features1: torch.Tensor, temperature: float,
                   skip_softmax: bool = False, threshold: float = 0.0,
                   valid0: torch.Tensor | None = None, valid1: torch.Tensor | None = None,
                   chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours of the dual-softmax confidence without the (L0, L1) matrix.

    features0 (L0, C), features1 (L1, C): the coarse features, each already divided by
    sqrt(C) (as the reference does). The confidence is
    ``softmax(S, 0) * softmax(S, 1)`` with ``S = f0 f1^T / temperature``, i.e.
    ``exp(2 S_ij - r_i - c_j)`` with r, c the row and column log-sum-exps; so cell j's
    best older cell maximises ``2 S_ij - r_i`` and cell i's best newer cell ``2 S_ij - c_j``.
    Pass 1 over blocks of rows: r (whole rows are in the block), c (a running
    log-sum-exp) and each column's arg-max (``_row_pass``). Candidates:
    (i*(j), j) with confidence above ``threshold`` and both cells valid (``valid0`` (L0,),
    ``valid1`` (L1,) bool, None: all). Pass 2: the row arg-max of the candidates' rows only.
    Ties go to the lowest index, as ``torch.max``. Returns (i_ids, j_ids, scores) of the
    pairs (i, j) that are each other's best, above the threshold and valid: the
    reference's mask, by ascending i. Pairs whose confidences are within float32 rounding
    of the logits of another cell's (near ties) may go either way, as between any two
    matrix-product blockings.

    ``skip_softmax`` (the config's ``coarse_matching_skip_softmax``): the confidence is S.
    """
    rows, columns = features0.shape[0], features1.shape[0]
    device = features0.device
    step = chunk_rows(rows, columns, device, chunk_bytes)
    product = _BlockProduct(features0, features1, step)
    best_col, best_row_of_col, col_lse = _row_pass(features0, product, temperature, step, skip_softmax)

    # Candidates (i*(j), j): their confidence is known now, the threshold and the border
    # filters apply before any row is looked at again.
    j_ids = torch.arange(columns, device=device)
    i_ids = best_row_of_col
    scores = best_col if skip_softmax else torch.exp(best_col - col_lse)
    keep = scores > threshold
    if valid1 is not None:
        keep &= valid1
    if valid0 is not None:
        keep &= valid0[i_ids]
    i_ids, j_ids, scores = i_ids[keep], j_ids[keep], scores[keep]
    if len(i_ids) == 0:
        return i_ids, j_ids, scores

    # Pass 2: is j the best newer cell of its candidate row i?
    candidate_rows = torch.unique(i_ids)
    best_of_row = torch.empty(rows, dtype=torch.long, device=device)
    for start in range(0, len(candidate_rows), step):
        chunk = candidate_rows[start:start + step]
        block = product.row_major(features0[chunk]).div_(temperature)
        if not skip_softmax:
            block.sub_(col_lse * 0.5)  # S - c / 2: half of 2 S - c, exactly, the same arg-max
        best_of_row[chunk] = block.max(1).indices
    mutual = best_of_row[i_ids] == j_ids
    i_ids, j_ids, scores = i_ids[mutual], j_ids[mutual], scores[mutual]
    order = torch.argsort(i_ids)  # as the reference: by older cell (each at most once)
    return i_ids[order], j_ids[order], scores[order]


class _BlockProduct:
    """``rows @ features1.T`` for blocks of at most ``step`` rows, (r, L1), and a buffer
    of the block's layout for its exponentials. float32 on a CPU with oneDNN: a 1x1
    convolution (kp_ros/core/pointwise_products.py), the result the transposed view of a
    fresh (L1, r) tensor; else ``torch.mm`` into one reused (step, L1) buffer."""

    def __init__(self, features0: torch.Tensor, features1: torch.Tensor, step: int):
        self.convolution = conv_products(features0.device) and features0.dtype == torch.float32
        self.features1 = features1.contiguous()
        if not self.convolution:
            self.features1_t = features1.transpose(0, 1).contiguous()
            self.buffers = [torch.empty(step, features1.shape[0], device=features0.device, dtype=features0.dtype)
                            for _ in range(2)]

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if self.convolution:
            return pixels_times_rows(self.features1, rows.contiguous()).T
        return torch.mm(rows, self.features1_t, out=self.buffers[0][:len(rows)])

    def row_major(self, rows: torch.Tensor) -> torch.Tensor:
        """The same product with contiguous rows, (r, L1), for arg-maxes along rows
        (the convolution's other orientation: torch's max along a strided dimension
        costs ~3x that along a contiguous one)."""
        if self.convolution:
            return pixels_times_rows(rows.contiguous(), self.features1)
        return self(rows)

    def like(self, block: torch.Tensor) -> torch.Tensor:
        """A tensor of ``block``'s shape and layout, for the exponentials."""
        return torch.empty_like(block) if self.convolution else self.buffers[1][:len(block)]


def _row_pass(features0: torch.Tensor, product: _BlockProduct, temperature: float, step: int,
              skip_softmax: bool):
    """Pass 1: per column the best row of ``2 S - r`` (of S when ``skip_softmax``), its
    value, and the column log-sum-exps c (None when ``skip_softmax``).

    Per block (the similarities and their exponentials, see ``_BlockProduct``):
    r = m + log sum_j exp(S - m) with m the row maxima (whole rows are in the block); the
    block's share of c from those same row-shifted exponentials (``_block_column_lse``),
    merged into a running log-sum-exp; then S - r / 2 in place, its column maxima and
    arg-max (the maxima doubled at the end: those of 2 S - r). r and each block's share of
    c are functions of the row's or column's own values only, so exact duplicates of a
    row or a column get exactly equal values in any block, and ties stay ties.
    """
    rows, columns = features0.shape[0], product.features1.shape[0]
    device = features0.device
    best_col = torch.full((columns,), -torch.inf, device=device)
    best_row_of_col = torch.zeros(columns, dtype=torch.long, device=device)
    col_lse = torch.full((columns,), -torch.inf, device=device, dtype=_LSE_DTYPE)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = product(features0[start:stop]).div_(temperature)
        if not skip_softmax:
            exponentials = product.like(block)
            row_max = block.amax(1, keepdim=True)
            _shifted_exp(block, row_max, exponentials)
            row_lse = row_max + torch.log(exponentials.sum(1, keepdim=True))
            col_lse = torch.logaddexp(col_lse, _block_column_lse(block, exponentials, row_max[:, 0]))
            # S - r / 2: half of 2 S - r, exactly (a power of two), in one pass instead of two.
            block.sub_(row_lse.mul_(0.5))
        # max with indices in one pass (first of ties), ~2.5x faster than amax then arg-max.
        value, row_of_value = block.max(0)
        better = value > best_col  # strict: an earlier block keeps a tie
        best_col = torch.where(better, value, best_col)
        best_row_of_col = torch.where(better, row_of_value + start, best_row_of_col)
    if skip_softmax:
        return best_col, best_row_of_col, None
    return best_col.mul_(2), best_row_of_col, col_lse.to(best_col.dtype)


# The column log-sum-exps are accumulated in float64 (vectors of one value per cell): the
# merge of many blocks' shares then adds no float32 rounding.
_LSE_DTYPE = torch.float64
# A column whose share in a block sums below this (relative to the block's largest row
# maximum) is recomputed with its own maximum as the shift: the terms the shared shift
# underflows (each below 2^-126) are then at most rows * 2^-36 of its sum.
_MIN_SHARED_SHIFT_SUM = 2.0 ** -90
# Above this share of such columns the whole block is recomputed (no gathered copy):
# similarities spread over far more than float32's exponent range, as with random-init
# weights (row maxima from 1e10 to 1e12), leave almost every column there.
_MAX_GATHERED_SHARE = 0.25
# A row maximum this far below the block's best (the same bound, in natural-log units)
# adds only terms below it.
_FAR_BELOW = -math.log(_MIN_SHARED_SHIFT_SUM)


def _block_column_lse(block: torch.Tensor, exponentials: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """log sum_i exp(S_ij) over the block's rows, per column j, from the row-shifted
    exponentials E = exp(S - m) (m the row maxima): sum_i exp(S_ij) = e^g sum_i E_ij
    exp(m_i - g) with g the largest m, one matrix-vector product instead of the five
    elementwise passes (column maxima, shift, scale, exp2, sum) a column-shifted
    exponential takes. The weights exp(m - g) come from float64, so the shares carry
    only E's own rounding. Columns whose share underflows against g (a column whose best
    row in the block is far below the block's best) are recomputed with their own
    maxima as the shift, as ``_column_lse``. Runs after E is complete and before the
    block is changed; E may be overwritten (the whole-block recomputation's scratch)."""
    shift = row_max.max()
    if (row_max < shift - _FAR_BELOW).sum() > _MAX_GATHERED_SHARE * len(row_max):
        # Many rows far below the best: most columns would be recomputed, skip the product.
        return _column_lse(block, exponentials)
    weights = torch.exp(row_max.to(_LSE_DTYPE) - shift.to(_LSE_DTYPE)).to(block.dtype)
    sums = torch.mv(exponentials.t(), weights)
    lse = torch.log(sums.to(_LSE_DTYPE)).add_(shift.to(_LSE_DTYPE))
    low = torch.nonzero(sums < _MIN_SHARED_SHIFT_SUM)[:, 0]
    if len(low) > _MAX_GATHERED_SHARE * len(sums):
        return _column_lse(block, exponentials)
    if len(low):
        columns = block[:, low]
        lse[low] = _column_lse(columns, torch.empty_like(columns))
    return lse


def _column_lse(block: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Per column, max + log sum exp(S - max) in _LSE_DTYPE (``scratch``: a tensor of
    ``block``'s shape, overwritten)."""
    own_max = block.amax(0)
    own_sums = _shifted_exp(block, own_max, scratch).sum(0)
    return torch.log(own_sums.to(_LSE_DTYPE)).add_(own_max.to(_LSE_DTYPE))


def _shifted_exp(block: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """exp(block - shift) into ``out``, as exp2 (see LOG2_E)."""
    return torch.sub(block, shift, out=out).mul_(LOG2_E).exp2_()
