"""The fine pyramid on tiles (kp_ros/core/eloftr_fine_tiles.py) against the whole fine maps.

The windows cut from the tiles must be those ``cut_windows`` cuts from the whole maps,
within 1e-5 relative (float32), wherever the cells lie (corners, edges, neighbouring
tiles, alone, all of them), for any tile size and grids that are not a multiple of it;
through the matcher the same matches with positions within 1e-3 px. The models get
non-trivial BatchNorm statistics (as in test_eloftr_fold) so that a wrongly handled
bias at a crop edge would show.
"""
from __future__ import annotations

import pytest
import torch

import kp_ros.core.eloftr as eloftr
from conftest import synthetic_frame
from kp_ros.core.eloftr import CoarseMatches, EfficientLoFTRStreamMatcher
from kp_ros.core.eloftr_fine_tiles import TilePlan, axis_plan, full_map_macs, tile_windows
from kp_ros.core.eloftr_fold import fold_fine_fusion
from kp_ros.core.eloftr_ops import cut_windows
from kp_ros.core.random_init import build_eloftr
from test_eloftr_correctness import MOTIONS, THRESHOLD, HandMadeFeatureMatcher, moved_pair
from test_eloftr_fold import OracleCoarse, assert_same_matches, randomise_batch_norms, relative_error

REL_TOLERANCE = 1e-5
GRID = (11, 13)  # coarse cells: not a multiple of the tile sizes below


@pytest.fixture(scope="module", params=["tiny", "full"])
def pyramid(request):
    """A folded fine fusion and random inputs on a GRID of coarse cells, with the whole
    maps of both frames as the reference."""
    torch.set_flush_denormal(True)
    model = randomise_batch_norms(build_eloftr(request.param, seed=0))
    fusion = fold_fine_fusion(model)
    config = model.config
    height, width = GRID
    generator = torch.Generator().manual_seed(4)
    coarse = [torch.randn(1, config.hidden_size, height, width, generator=generator) for _ in range(2)]
    residuals = [[torch.randn(1, channels, height * scale, width * scale, generator=generator)
                  for channels, scale in zip(config.fine_fusion_dims[1:], (2, 4))] for _ in range(2)]
    with torch.inference_mode():
        full = fusion.forward_pyramid(torch.cat(coarse), [torch.cat(level) for level in zip(*residuals)])
    return fusion, coarse, residuals, full, config.fine_kernel_size


def cells(pattern: str) -> tuple[list[int], list[int]]:
    """(cells of frame 0, cells of frame 1) for a named layout on GRID."""
    height, width = GRID

    def at(y, x):
        return y * width + x
    corners = [at(0, 0), at(0, width - 1), at(height - 1, 0), at(height - 1, width - 1)]
    edges = [at(0, 5), at(height - 1, 6), at(4, 0), at(7, width - 1), at(1, 1), at(height - 2, width - 2)]
    adjacent = [at(2, 2), at(2, 3), at(3, 2), at(3, 3), at(5, 7), at(5, 8), at(6, 8)]
    isolated = [at(5, 6)]
    everything = list(range(height * width))
    return {"corners": (corners, corners[::-1]), "edges": (edges, adjacent),
            "adjacent": (adjacent, edges), "isolated": (isolated, corners),
            "all": (everything, everything[::-1])}[pattern]


@pytest.mark.parametrize("tile_cells", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("pattern", ["corners", "edges", "adjacent", "isolated", "all"])
def test_tile_windows_equal_the_whole_maps_windows(pyramid, pattern, tile_cells):
    fusion, coarse, residuals, full, kernel = pyramid
    ids0, ids1 = (torch.tensor(ids) for ids in cells(pattern))
    width = GRID[1]
    expected0 = cut_windows(full[0], ids0, width, 8, kernel, padding=0)
    expected1 = cut_windows(full[1], ids1, width, 8, kernel + 2, padding=1)
    with torch.inference_mode():
        got0, got1 = tile_windows(fusion, coarse, residuals, [ids0, ids1], [0, 1], kernel, tile_cells)
    assert got0.shape == expected0.shape and got1.shape == expected1.shape
    assert relative_error(got0, expected0) <= REL_TOLERANCE
    assert relative_error(got1, expected1) <= REL_TOLERANCE


def test_small_batches_give_the_same_windows(pyramid):
    """Batches split by memory (down to one tile each) change nothing."""
    fusion, coarse, residuals, full, kernel = pyramid
    ids0, ids1 = (torch.tensor(ids) for ids in cells("all"))
    with torch.inference_mode():
        whole = tile_windows(fusion, coarse, residuals, [ids0, ids1], [0, 1], kernel, 2)
        single = tile_windows(fusion, coarse, residuals, [ids0, ids1], [0, 1], kernel, 2, batch_bytes=1)
    for a, b in zip(whole, single):
        assert relative_error(a, b) <= REL_TOLERANCE


def test_window_border_pixels_are_the_zero_padding(pyramid):
    fusion, coarse, residuals, _, kernel = pyramid
    ids = torch.tensor([0])  # top-left cell: the 10x10 window's first row and column are outside
    with torch.inference_mode():
        _, windows = tile_windows(fusion, coarse, residuals, [ids, ids], [0, 1], kernel, 4)
    window = windows[0].reshape(kernel + 2, kernel + 2, -1)
    assert window[0].abs().max() == 0 and window[:, 0].abs().max() == 0
    assert window[1:, 1:].abs().min(-1).values.max() > 0


def test_halos_are_the_receptive_field():
    """An interior tile of cells [c0, c1): coarse [c0-3, c1+3), quarter [2c0-4, 2c1+4) ->
    [2c0-2, 2c1+2), half [4c0-3, 4c1+3) -> [4c0-1, 4c1+1), full res [8c0-1, 8c1+1)."""
    c0, c1 = 10, 14
    plan = axis_plan(c0, c1, 40, blocks=2, stride=8, kernel=8)
    assert plan.coarse == (c0 - 3, c1 + 3)
    assert plan.targets == ((2 * c0 - 4, 2 * c1 + 4), (4 * c0 - 3, 4 * c1 + 3))
    assert plan.outputs == ((2 * c0 - 2, 2 * c1 + 2), (4 * c0 - 1, 4 * c1 + 1))
    assert plan.final == plan.window == (8 * c0 - 1, 8 * c1 + 1)
    assert plan.convs == (((0, 0), (0, 0)), ((0, 0), (0, 0)))
    # At the image's edges: clipped, zero padding on that side only, windows padded.
    first = axis_plan(0, 4, 40, blocks=2, stride=8, kernel=8)
    assert first.coarse == (0, 7) and first.targets[0] == (0, 12) and first.final == (0, 33)
    assert first.window == (-1, 33) and first.convs[0] == ((1, 0), (1, 0))
    last = axis_plan(36, 40, 40, blocks=2, stride=8, kernel=8)
    assert last.coarse == (33, 40) and last.final == (287, 320) and last.window == (287, 321)
    assert last.convs[1] == ((0, 1), (0, 1))


def test_interior_tiles_share_one_batch(pyramid):
    fusion = pyramid[0]
    height, width = 40, 40
    ids = torch.tensor([y * width + x for y in (13, 17, 21) for x in (13, 17, 21)])  # 9 interior tiles
    plan = TilePlan(fusion, (height, width), [ids, ids], 4, 8, 8)
    assert plan.tile_count == 18 and len(plan.groups) == 1
    assert plan.macs() < full_map_macs(fusion, height, width)  # both frames, 9 % of the cells


# -- through the matcher ---------------------------------------------------------------------


def saved_with_batch_norms(tmp_path_factory, size, seed, norm_seed):
    """A random model with non-trivial BatchNorms, saved like a checkpoint."""
    from transformers import EfficientLoFTRImageProcessor
    path = tmp_path_factory.mktemp(f"eloftr_{size}_bn")
    randomise_batch_norms(build_eloftr(size, seed=seed), seed=norm_seed).save_pretrained(path)
    EfficientLoFTRImageProcessor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    return saved_with_batch_norms(tmp_path_factory, "tiny", 1, 1)


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    return saved_with_batch_norms(tmp_path_factory, "full", 0, 2)


def features_and_coarse(matcher, height=96, width=128):
    image0 = synthetic_frame(height, width, seed=0)
    image1 = synthetic_frame(height, width, seed=0, shift=(3, 2))
    with torch.inference_mode():
        features = [matcher.extract(matcher.preprocess(image)) for image in (image0, image1)]
        coarse = matcher.transform(*features)
    return features, coarse


def some_matches(count: int, cells: int, seed: int = 0) -> CoarseMatches:
    generator = torch.Generator().manual_seed(seed)
    i_ids = torch.randperm(cells, generator=generator)[:count]
    j_ids = torch.randperm(cells, generator=generator)[:count]
    return CoarseMatches(i_ids, j_ids, torch.ones(count))


@pytest.mark.parametrize("model_dir", ["saved_dir", "full_dir"])
def test_matcher_fine_windows_equal_the_whole_maps(request, model_dir):
    matcher = EfficientLoFTRStreamMatcher(str(request.getfixturevalue(model_dir)), device="cpu",
                                          resize="native", fine_tile_cells=4)
    features, coarse = features_and_coarse(matcher)
    matches = some_matches(5, 12 * 16)
    with torch.inference_mode():
        assert isinstance(matcher.fine_tile_plan(features[0], matches), TilePlan)
        got = matcher.fine_windows(*coarse, *features, matches)
        expected = matcher.map_windows(*matcher.fine_maps(*coarse, *features), matches, features[0])
    for a, b in zip(got, expected):
        assert a.shape == b.shape and relative_error(a, b) <= REL_TOLERANCE


def test_the_cost_rule_takes_tiles_for_few_cells_and_maps_for_all(saved_dir):
    matcher = EfficientLoFTRStreamMatcher(str(saved_dir), device="cpu", resize="native")
    features, _ = features_and_coarse(matcher, 480, 640)
    cells = 60 * 80
    assert isinstance(matcher.fine_tile_plan(features[0], some_matches(10, cells)), TilePlan)
    everything = torch.arange(cells)
    assert matcher.fine_tile_plan(features[0], CoarseMatches(everything, everything, torch.ones(cells))) is None
    # Tiles off, the unfolded modules (the reference path) or a subclass's own fine maps: whole maps.
    off = EfficientLoFTRStreamMatcher(str(saved_dir), device="cpu", resize="native", fine_tile_cells=0)
    unfused = EfficientLoFTRStreamMatcher(str(saved_dir), device="cpu", resize="native", reparameterize=False)
    hand_made = HandMadeFeatureMatcher(str(saved_dir), device="cpu", resize="native")
    for other in (off, unfused, hand_made):
        assert other.fine_tile_plan(features[0], some_matches(10, cells)) is None
    with pytest.raises(ValueError, match="fine_tile_cells"):
        EfficientLoFTRStreamMatcher(str(saved_dir), device="cpu", fine_tile_cells=-1)


@pytest.mark.parametrize("motion", ["sub_cell_shift", "rotation_8deg"])
def test_oracle_matches_and_positions_with_tiles_equal_the_whole_maps(saved_dir, motion, monkeypatch):
    """Many true matches (hand-made coarse features, the model's own fine pyramid): tiles
    forced on (any work) give the matches of ``fine_tile_cells=0``."""
    options = {"device": "cpu", "match_threshold": THRESHOLD, "resize": "native"}
    tiled = OracleCoarse(str(saved_dir), fine_tile_cells=3, **options)
    whole = OracleCoarse(str(saved_dir), fine_tile_cells=0, **options)
    image0, image1 = moved_pair(synthetic_frame(480, 640, seed=3), MOTIONS[motion][0])
    expected = whole.match_pair(image0, image1)
    monkeypatch.setattr(eloftr, "TILE_WORK_RATIO", 0.0)
    used = []
    plan = tiled.fine_tile_plan
    monkeypatch.setattr(tiled, "fine_tile_plan", lambda *args: used.append(plan(*args)) or used[-1])
    got = tiled.match_pair(image0, image1)
    assert len(used) == 1 and isinstance(used[0], TilePlan)
    assert len(expected["scores"]) >= 50
    assert_same_matches(got, expected)


def test_bf16_tiles_stay_within_bf16_rounding_of_the_maps(saved_dir):
    matcher = EfficientLoFTRStreamMatcher(str(saved_dir), device="cpu", resize="native",
                                          precision="bf16", fine_tile_cells=2)
    features, coarse = features_and_coarse(matcher)
    matches = some_matches(8, 12 * 16, seed=1)
    with torch.inference_mode():
        got = matcher.fine_windows(*coarse, *features, matches)
        expected = matcher.map_windows(*matcher.fine_maps(*coarse, *features), matches, features[0])
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and relative_error(a, b) <= 0.05


def test_tile_path_synchronisations(saved_dir, monkeypatch):
    """With tiles: the cells' one copy to the host and one upload of the gather indices
    on top of the whole-map path's (see test_eloftr_syncs); the whole-map decision for
    many cells is taken from the count alone, without a copy."""
    from sync_counting import SyncCounter
    matcher = EfficientLoFTRStreamMatcher(str(saved_dir), device="cpu", resize="native", fine_tile_cells=2)
    features, coarse = features_and_coarse(matcher)
    few, many = some_matches(3, 12 * 16), some_matches(12 * 16, 12 * 16)
    with torch.inference_mode():
        counter = SyncCounter(monkeypatch)
        matcher.fine_windows(*coarse, *features, few)
        tiles, counter.calls = counter.calls, {}
        matcher.fine_windows(*coarse, *features, many)
        monkeypatch.undo()
    assert tiles == {"cpu": 1, "torch.tensor": 1}, tiles
    assert counter.calls == {}, counter.calls
