"""EfficientLoFTR's fine windows from the fine-fusion pyramid run on tiles only.

The fine stage needs, per coarse match, the 8x8 window of its older cell and the 10x10
window (1-pixel margin, zero outside the image) of its newer cell, cut from two
full-resolution fine maps. With few matches nearly all of that map is never read. Here
the pyramid (``FoldedFineFusion.forward_pyramid``: a 1x1 conv at 1/8, bilinear x2, then
per block a 1x1 lateral on the backbone residual, two 3x3 convs, bilinear x2) runs only
on tiles of T x T coarse cells that hold a needed cell, each tile with its receptive
field's halo at every level, and the windows are cut from the tiles.

Exactness: every output pixel of the pyramid depends on a bounded neighbourhood (a 3x3
conv on one pixel each way; bilinear x2, align_corners False, output ``o`` on inputs
``floor((o-1)/2)`` and ``floor((o+1)/2)``, clamped at the edge). For a tile of cells
[c0, c1) along one axis the ranges needed, worked backwards from the full-resolution
pixels [8c0-1, 8c1+1) (the 10x10 windows' need), are:
    full res [8c0-1, 8c1+1) <- half res after the convs [4c0-1, 4c1+1)
    <- half res [4c0-3, 4c1+3) (+ lateral) <- quarter res after the convs [2c0-2, 2c1+2)
    <- quarter res [2c0-4, 2c1+4) (+ lateral) <- coarse [c0-3, c1+3),
each clipped to the level's [0, size). On a crop, the convolutions run unpadded except
on a side that is the image's true edge, where they get the zero padding they have on
the whole map; the upsampling clamps at a crop's edge as at the image's, which is right
at a true edge, and the wrong pixels next to an interior crop edge lie outside the range
kept. So each kept pixel equals the whole map's up to float rounding
(test/test_eloftr_fine_tiles.py). Tiles whose crops have the same shapes (all interior
ones) run as one batch, both frames together.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kp_ros.core.eloftr_fold import FoldedFineFusion, upsample

CONVS_PER_BLOCK = 2  # out_conv2, out_conv3: 3x3, padding 1
# Bytes of float32 intermediates per batch of tiles: bounds the tile path's peak memory
# (a 16-cell interior tile of the full-size model needs ~8 MB at its widest level).
BATCH_BYTES = 96 * 2 ** 20


@dataclass(frozen=True)
class AxisPlan:
    """One tile's ranges along one axis, absolute at each level, as [lo, hi)."""
    coarse: tuple[int, int]                      # the coarse crop
    targets: tuple[tuple[int, int], ...]         # per block: its input range (the lateral's crop)
    outputs: tuple[tuple[int, int], ...]         # per block: what its convs must leave
    convs: tuple[tuple[tuple[int, int], ...], ...]  # per block, per conv: zero padding (lo, hi)
    final: tuple[int, int]                       # full-res pixels computed (clipped)
    window: tuple[int, int]                      # full-res pixels of the tile's windows (unclipped)

    def key(self) -> tuple:
        """Everything that sets the tile's tensor shapes and slices, relative to the crop."""
        base = self.coarse[0]
        rel = [self.coarse[1] - base]
        previous = self.coarse[0]
        for (lo, hi), (out_lo, out_hi), pads in zip(self.targets, self.outputs, self.convs):
            rel += [lo - 2 * previous, hi - lo, out_lo - lo, out_hi - lo, *sum(pads, ())]
            previous = out_lo
        rel += [self.final[0] - 2 * previous, self.final[1] - self.final[0],
                self.final[0] - self.window[0], self.window[1] - self.final[1]]
        return tuple(rel)


def _clip(lo: int, hi: int, size: int) -> tuple[int, int]:
    return max(0, lo), min(size, hi)


def _upsample_source(lo: int, hi: int, size: int) -> tuple[int, int]:
    """The input range (clipped to [0, size)) a bilinear x2 needs for outputs [lo, hi)."""
    return _clip((lo - 1) // 2, -((-(hi + 1)) // 2), size)


def axis_plan(c0: int, c1: int, cells: int, blocks: int, stride: int, kernel: int,
              margin: int = 1) -> AxisPlan:
    """Ranges for the tile of coarse cells [c0, c1) of a ``cells``-long axis: a pyramid
    of ``blocks`` blocks (full res = ``stride`` = 2^(blocks+1) pixels per cell), windows of
    ``kernel`` pixels from ``stride * c`` with ``margin`` pixels each side."""
    if stride != 2 ** (blocks + 1):
        raise ValueError(f"stride {stride} does not match {blocks} x2 blocks after a x2")
    window = (stride * c0 - margin, stride * (c1 - 1) + kernel + margin)
    final = _clip(*window, stride * cells)
    targets, outputs = [], []
    need = final
    for block in reversed(range(blocks)):
        size = cells * 2 ** (block + 1)
        output = _upsample_source(*need, size)
        target = _clip(output[0] - CONVS_PER_BLOCK, output[1] + CONVS_PER_BLOCK, size)
        targets.insert(0, target)
        outputs.insert(0, output)
        need = target
    coarse = _upsample_source(*need, cells)
    # Forward: which sides get zero padding (true edges), and a check of the ranges.
    convs = []
    valid = _upsampled_valid(coarse, cells)
    for block, (target, output) in enumerate(zip(targets, outputs)):
        size = cells * 2 ** (block + 1)
        assert valid[0] <= target[0] and target[1] <= valid[1], (c0, c1, cells, valid, target)
        lo, hi = target
        pads = []
        for _ in range(CONVS_PER_BLOCK):
            pads.append((int(lo == 0), int(hi == size)))
            lo, hi = (lo if lo == 0 else lo + 1), (hi if hi == size else hi - 1)
        assert lo <= output[0] and output[1] <= hi, (c0, c1, cells, (lo, hi), output)
        convs.append(tuple(pads))
        valid = _upsampled_valid(output, size)
    assert valid[0] <= final[0] and final[1] <= valid[1], (c0, c1, cells, valid, final)
    return AxisPlan(coarse=coarse, targets=tuple(targets), outputs=tuple(outputs), convs=tuple(convs),
                    final=final, window=window)


def _upsampled_valid(source: tuple[int, int], size: int) -> tuple[int, int]:
    """Outputs of a bilinear x2 on the crop ``source`` of a ``size``-long axis that equal
    the whole axis' upsampling: all but the outermost one at an interior crop edge."""
    lo, hi = source
    return (2 * lo if lo == 0 else 2 * lo + 1), (2 * hi if hi == size else 2 * hi - 1)


def _conv_macs(conv: torch.nn.Conv2d) -> int:
    return conv.weight[0].numel() * conv.out_channels  # multiply-adds per output pixel


def _area(rows: tuple[int, int], cols: tuple[int, int]) -> int:
    return (rows[1] - rows[0]) * (cols[1] - cols[0])


def tile_macs(fusion: FoldedFineFusion, plan_y: AxisPlan, plan_x: AxisPlan) -> int:
    """Convolution multiply-adds of one tile's pyramid."""
    macs = _conv_macs(fusion.out_conv) * _area(plan_y.coarse, plan_x.coarse)
    for index, block in enumerate(fusion.blocks):
        rows, cols = plan_y.targets[index], plan_x.targets[index]
        macs += _conv_macs(block["out_conv1"]) * _area(rows, cols)
        for conv, pads_y, pads_x in zip((block["out_conv2"], block["out_conv3"]),
                                        plan_y.convs[index], plan_x.convs[index]):
            rows = (rows[0] + 1 - pads_y[0], rows[1] - 1 + pads_y[1])
            cols = (cols[0] + 1 - pads_x[0], cols[1] - 1 + pads_x[1])
            macs += _conv_macs(conv) * _area(rows, cols)
    return macs


def full_map_macs(fusion: FoldedFineFusion, height: int, width: int) -> int:
    """Convolution multiply-adds of one frame's whole pyramid on an (h/8, w/8) coarse grid."""
    macs = _conv_macs(fusion.out_conv) * height * width
    for index, block in enumerate(fusion.blocks):
        area = height * width * 4 ** (index + 1)
        macs += area * sum(_conv_macs(block[name]) for name in ("out_conv1", "out_conv2", "out_conv3"))
    return macs


def _tile_bytes(fusion: FoldedFineFusion, plan_y: AxisPlan, plan_x: AxisPlan) -> int:
    """Float32 bytes of a tile's widest intermediate (times 3: a conv's input, output and
    the upsampled map)."""
    widest = fusion.out_conv.out_channels * 4 * _area(plan_y.coarse, plan_x.coarse)
    for index, block in enumerate(fusion.blocks):
        channels = max(block["out_conv2"].out_channels, block["out_conv3"].out_channels)
        widest = max(widest, channels * 4 * _area(plan_y.targets[index], plan_x.targets[index]))
    widest = max(widest, fusion.blocks[-1]["out_conv3"].out_channels * 4 * _area(plan_y.final, plan_x.final))
    return 3 * widest


def host_ids(cell_ids: list[torch.Tensor]) -> list[np.ndarray]:
    """The cells of each frame on the host, in one copy (a synchronisation on CUDA)."""
    flat = torch.cat([ids.reshape(-1).long() for ids in cell_ids]).cpu().numpy()
    return np.split(flat, np.cumsum([ids.numel() for ids in cell_ids])[:-1])


class TilePlan:
    """The active tiles of some frames for the cells they need (host-side numbers): their
    ranges, their grouping into batches of equal shapes, and their work."""

    def __init__(self, fusion: FoldedFineFusion, grid: tuple[int, int], cell_ids: list[np.ndarray],
                 tile_cells: int, kernel: int, stride: int):
        if tile_cells < 1:
            raise ValueError(f"tile_cells must be >= 1, got {tile_cells}")
        self.fusion, self.grid, self.tile_cells = fusion, grid, int(tile_cells)
        self.kernel, self.stride = kernel, stride
        height, width = grid
        self.tiles_x = -(-width // tile_cells)
        self.tile_total = self.tiles_x * -(-height // tile_cells)
        self.cell_ids = [np.asarray(ids, np.int64) for ids in cell_ids]
        # Per frame: each cell's tile (row-major over the tile grid) and the active tiles.
        self.cell_tiles = [(ids // width // tile_cells) * self.tiles_x + (ids % width) // tile_cells
                           for ids in self.cell_ids]
        self.active = [np.unique(tiles).tolist() for tiles in self.cell_tiles]
        rows, cols = axis_plans(height, tile_cells, len(fusion.blocks), stride, kernel), \
            axis_plans(width, tile_cells, len(fusion.blocks), stride, kernel)
        # (frame, tile) -> (plan_y, plan_x); groups: shape key -> [(frame, tile)]
        self.plans = {}
        self.groups: dict[tuple, list[tuple[int, int]]] = {}
        for frame, tiles in enumerate(self.active):
            for tile in tiles:
                plans = rows[tile // self.tiles_x], cols[tile % self.tiles_x]
                self.plans[frame, tile] = plans
                self.groups.setdefault((plans[0].key(), plans[1].key()), []).append((frame, tile))

    @property
    def tile_count(self) -> int:
        return len(self.plans)

    def macs(self) -> int:
        """Convolution multiply-adds of all active tiles."""
        return sum(tile_macs(self.fusion, *plans) for plans in self.plans.values())

    def batches(self, batch_bytes: int = BATCH_BYTES):
        """Lists of (frame, tile) of equal shapes, each within ``batch_bytes``."""
        for members in self.groups.values():
            step = max(1, batch_bytes // _tile_bytes(self.fusion, *self.plans[members[0]]))
            for start in range(0, len(members), step):
                yield members[start:start + step]


@functools.lru_cache(maxsize=64)
def axis_plans(cells: int, tile_cells: int, blocks: int, stride: int, kernel: int) -> tuple[AxisPlan, ...]:
    """The plans of all tiles along an axis of ``cells`` coarse cells."""
    return tuple(axis_plan(start, min(cells, start + tile_cells), cells, blocks, stride, kernel)
                 for start in range(0, cells, tile_cells))


def tile_macs_bounds(fusion: FoldedFineFusion, grid: tuple[int, int], tile_cells: int, kernel: int,
                     stride: int) -> tuple[int, int]:
    """(least, most) convolution work of one tile of this grid, without knowing which:
    decides the clear cases of a cost rule before the cells are read on the host."""
    per_axis = [list({plan.key(): plan for plan in axis_plans(cells, tile_cells, len(fusion.blocks), stride,
                                                              kernel)}.values()) for cells in grid]
    costs = [tile_macs(fusion, plan_y, plan_x) for plan_y in per_axis[0] for plan_x in per_axis[1]]
    return min(costs), max(costs)


def _crop(tensor: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    return tensor[..., rows[0]:rows[1], cols[0]:cols[1]]


def _conv(conv: torch.nn.Conv2d, hidden: torch.Tensor, pads_y: tuple[int, int],
          pads_x: tuple[int, int]) -> torch.Tensor:
    """A 3x3 padding-1 conv with the zero padding on the given sides only."""
    if any(pads_y) or any(pads_x):
        hidden = F.pad(hidden, (*pads_x, *pads_y))
    return F.conv2d(hidden, conv.weight, conv.bias)


def run_tiles(fusion: FoldedFineFusion, coarse: torch.Tensor, residuals: list[torch.Tensor],
              plan_y: AxisPlan, plan_x: AxisPlan, origins: list[tuple[AxisPlan, AxisPlan]],
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The pyramid on a batch of equally shaped tiles.

    ``coarse`` / ``residuals``: per tile, the frame's (1, C, h/8, w/8) coarse map (already
    divided by sqrt(C)) and its [1/4, 1/2] residuals, as lists of (frame maps) indexed by
    ``origins``' order; ``plan_y`` / ``plan_x``: the shared shape plan; ``origins``: each
    tile's own plans (absolute positions). Returns (G, Cf, window rows, window cols):
    the full-resolution pixels of the tiles' windows, zero outside the image.
    """
    def stack(level: int | None) -> torch.Tensor:
        crops = []
        for frame_maps, (py, px) in zip(coarse if level is None else residuals[level], origins):
            rows, cols = (py.coarse, px.coarse) if level is None else (py.targets[level], px.targets[level])
            crops.append(_crop(frame_maps, rows, cols))
        return torch.cat(crops).contiguous(memory_format=memory_format)

    hidden = fusion.out_conv(stack(None))
    previous_y, previous_x = plan_y.coarse[0], plan_x.coarse[0]
    for index, block in enumerate(fusion.blocks):
        rows, cols = plan_y.targets[index], plan_x.targets[index]
        hidden = _crop(upsample(hidden), (rows[0] - 2 * previous_y, rows[1] - 2 * previous_y),
                       (cols[0] - 2 * previous_x, cols[1] - 2 * previous_x))
        hidden = block["out_conv1"](stack(index)) + hidden
        pads_y, pads_x = plan_y.convs[index], plan_x.convs[index]
        hidden = block["activation"](_conv(block["out_conv2"], hidden, pads_y[0], pads_x[0]))
        hidden = _conv(block["out_conv3"], hidden, pads_y[1], pads_x[1])
        # Left after the convs: [lo + 1 - pad, ...) per conv; keep the next upsample's input.
        lo_y = rows[0] + sum(1 - pad[0] for pad in pads_y)
        lo_x = cols[0] + sum(1 - pad[0] for pad in pads_x)
        out_y, out_x = plan_y.outputs[index], plan_x.outputs[index]
        hidden = _crop(hidden, (out_y[0] - lo_y, out_y[1] - lo_y), (out_x[0] - lo_x, out_x[1] - lo_x))
        previous_y, previous_x = out_y[0], out_x[0]
    rows, cols = plan_y.final, plan_x.final
    hidden = _crop(upsample(hidden), (rows[0] - 2 * previous_y, rows[1] - 2 * previous_y),
                   (cols[0] - 2 * previous_x, cols[1] - 2 * previous_x))
    pad_y = (rows[0] - plan_y.window[0], plan_y.window[1] - rows[1])
    pad_x = (cols[0] - plan_x.window[0], plan_x.window[1] - cols[1])
    if any(pad_y) or any(pad_x):
        hidden = F.pad(hidden, (*pad_x, *pad_y))
    return hidden


def tile_windows(fusion: FoldedFineFusion, coarse: list[torch.Tensor], residuals: list[list[torch.Tensor]],
                 cell_ids: list[torch.Tensor], margins: list[int], kernel: int, tile_cells: int,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 plan: TilePlan | None = None, batch_bytes: int = BATCH_BYTES) -> list[torch.Tensor]:
    """Per frame f, the (M_f, (kernel + 2 margins[f])^2, Cf) fine windows of cells
    ``cell_ids[f]`` (window of cell c: full-res pixels from ``stride * c - margin``, zero
    outside the image), as ``cut_windows`` on the whole fine map gives them.

    coarse[f]: (1, C, h/8, w/8) as the pyramid takes it (divided by sqrt(C));
    residuals[f]: the backbone maps [1/4, 1/2]; margins[f] in {0, 1}; ``plan``: a
    ``TilePlan`` of these cells when already built (by a cost decision). Host-device
    synchronisations: the cells' copy to the host (unless ``plan`` is given) and one
    upload of the gather indices.
    """
    if any(not 0 <= margin <= 1 for margin in margins):
        raise ValueError(f"margins must be 0 or 1 (the tiles carry one pixel), got {margins}")
    height, width = coarse[0].shape[-2:]
    stride = residuals[0][-1].shape[-2] * 2 // height
    if plan is None:
        plan = TilePlan(fusion, (height, width), host_ids(cell_ids), tile_cells, kernel, stride)
    device = coarse[0].device
    batches = list(plan.batches(batch_bytes))
    # Host side: each tile's batch and place in it; each frame's cells sorted by batch, so
    # that a batch's cells are one slice; per cell its place and window corner in the batch.
    batch_of = np.full((len(cell_ids), plan.tile_total), -1, np.int64)
    place_of = np.zeros((len(cell_ids), plan.tile_total), np.int64)
    for number, members in enumerate(batches):
        for place, (frame, tile) in enumerate(members):
            batch_of[frame, tile], place_of[frame, tile] = number, place
    columns, bounds = [], []
    for frame, (ids, tiles) in enumerate(zip(plan.cell_ids, plan.cell_tiles)):
        order = np.argsort(batch_of[frame, tiles], kind="stable")
        sorted_ids, sorted_tiles = ids[order], tiles[order]
        y, x = sorted_ids // width, sorted_ids % width
        # Window corner inside the tile's window grid (whose origin is stride * c0 - 1).
        columns.append(np.stack([order, place_of[frame, sorted_tiles],
                                 stride * (y % plan.tile_cells) + 1 - margins[frame],
                                 stride * (x % plan.tile_cells) + 1 - margins[frame]]))
        bounds.append(np.searchsorted(batch_of[frame, sorted_tiles], np.arange(len(batches) + 1)))
    offsets = np.cumsum([0] + [column.shape[1] for column in columns])
    indices = torch.tensor(np.concatenate(columns, 1), device=device)  # the one upload
    pieces: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in cell_ids]
    for number, members in enumerate(batches):
        origins = [plan.plans[member] for member in members]
        maps = run_tiles(fusion, [coarse[frame] for frame, _ in members],
                         [[residuals[frame][level] for frame, _ in members] for level in range(len(fusion.blocks))],
                         *origins[0], origins, memory_format)
        maps = maps.permute(0, 2, 3, 1)  # (G, rows, cols, Cf)
        for frame in sorted({frame for frame, _ in members}):
            start, stop = offsets[frame] + bounds[frame][number], offsets[frame] + bounds[frame][number + 1]
            chosen, places, row0, col0 = indices[:, start:stop]
            size = kernel + 2 * margins[frame]
            steps = torch.arange(size, device=device)
            rows = (row0[:, None] + steps)[:, :, None]
            cols = (col0[:, None] + steps)[:, None, :]
            pieces[frame].append((chosen, maps[places[:, None, None], rows, cols].reshape(stop - start, size * size, -1)))
    channels = fusion.blocks[-1]["out_conv3"].out_channels
    windows = []
    for frame, ids in enumerate(plan.cell_ids):
        size = kernel + 2 * margins[frame]
        dtype = pieces[frame][0][1].dtype if pieces[frame] else coarse[frame].dtype
        out = torch.empty(len(ids), size * size, channels, dtype=dtype, device=device)
        for chosen, values in pieces[frame]:
            out[chosen] = values
        windows.append(out)
    return windows
