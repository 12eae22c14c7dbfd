"""EfficientLoFTR's host-device synchronisations per stream step, counted on the CPU with the
counting stub (the CUDA path runs the same calls): the output leaves the device in one copy."""
from __future__ import annotations

import numpy as np
import torch
from conftest import synthetic_frame
from sync_counting import SyncCounter

from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher
from kp_ros.core.preprocess import scale_to_source


def test_one_copy_back_per_step_with_the_same_values(tiny_eloftr_dir, monkeypatch):
    matcher = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", resize="native", match_threshold=0.0,
                                          geometric_verification="none")
    frames = [synthetic_frame(96, 128, shift=(8 * i, 0)) for i in range(2)]
    features = [matcher.extract(matcher.preprocess(f)) for f in frames]
    with torch.inference_mode():
        coarse = matcher.transform(*features)
        matches = matcher.select(matcher.match_coarse(*coarse, 0.0))
        points = matcher.refine(*matcher.fine_maps(*coarse, *features), matches, features[0])
    assert matches.scores.numel() > 0
    counter = SyncCounter(monkeypatch)
    with torch.inference_mode():
        result = matcher.finish(*points, matches.scores, *features)
    monkeypatch.undo()
    assert counter.calls == {"cpu": 1}, counter.calls
    # The values are those of one copy per array (the previous code), bit for bit.
    expected = {"keypoints0": scale_to_source(points[0], features[0].model_size, features[0].source_size).numpy(),
                "keypoints1": scale_to_source(points[1], features[1].model_size, features[1].source_size).numpy(),
                "scores": matches.scores.float().numpy()}
    for key, value in expected.items():
        assert result[key].dtype == np.float32 and result[key].shape == value.shape, key
        assert np.array_equal(result[key], value), key
        assert result[key].flags.c_contiguous and result[key].flags.writeable, key


def test_stream_step_synchronisations(tiny_eloftr_dir, monkeypatch):
    """Per step after the backbone: the mutual-NN selection (one mask index), the 3x3 grid
    constant of the refinement (one small upload) and the one copy back. (The whole fine
    maps here; the fine pyramid on tiles adds one copy of the cells to the host and one
    upload, see test_eloftr_fine_tiles.)"""
    matcher = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", resize="native", match_threshold=0.0,
                                          geometric_verification="none", fine_tile_cells=0)
    frames = [synthetic_frame(96, 128, shift=(8 * i, 0)) for i in range(2)]
    features = [matcher.extract(matcher.preprocess(f)) for f in frames]
    counter = SyncCounter(monkeypatch)
    result = matcher.match_features(*features)
    monkeypatch.undo()
    assert len(result["scores"]) > 0
    assert counter.calls == {"mask indexing": 1, "torch.tensor": 1, "cpu": 1}, counter.calls
