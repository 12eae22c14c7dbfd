"""Re-parameterised EfficientLoFTR (kp_ros/core/eloftr_fold.py) against transformers' modules.

Folding is exact algebra; what may differ is float rounding, bounded here: backbone and
fine-fusion maps within 1e-5 relative (float32), and through the whole matcher the same
mutual-NN pairs with positions within 1e-3 px. The models get non-trivial BatchNorm
statistics first (random init leaves them at mean 0, variance 1, scale 1, shift 0, which
would hide a wrong fold of the statistics).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_frame
from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher, FrameFeatures
from kp_ros.core.eloftr_fold import fold_backbone, fold_fine_fusion
from kp_ros.core.random_init import build_eloftr
from test_eloftr_correctness import MOTIONS, THRESHOLD, coarse_features, moved_pair

REL_TOLERANCE = 1e-5
POSITION_TOLERANCE = 1e-3  # px


def randomise_batch_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
                module.weight.copy_(0.7 + 0.6 * torch.rand(size, generator=generator))
                module.bias.copy_(0.1 * torch.randn(size, generator=generator))
    return model.eval()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


@pytest.fixture(scope="module", params=["tiny", "full"])
def model(request):
    return randomise_batch_norms(build_eloftr(request.param, seed=0))


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A tiny model with non-trivial BatchNorms, saved like a checkpoint (seed 1: ~20
    mutual-NN matches per pair at threshold 0 on random weights)."""
    from transformers import EfficientLoFTRImageProcessor
    path = tmp_path_factory.mktemp("eloftr_tiny_bn")
    randomise_batch_norms(build_eloftr("tiny", seed=1), seed=1).save_pretrained(path)
    EfficientLoFTRImageProcessor().save_pretrained(path)
    return path


def test_backbone_maps_equal_the_unfused_backbone(model):
    pixels = torch.rand(1, 1, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model.efficientloftr.backbone(pixels)
        got = fold_backbone(model)(pixels)
    assert len(got) == len(expected) == 3
    for level, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert relative_error(a, b) <= REL_TOLERANCE, f"map {level}: {relative_error(a, b):.2e}"


def test_every_block_is_one_convolution(model):
    folded = fold_backbone(model)
    blocks = sum(len(stage.blocks) for stage in model.efficientloftr.backbone.stages)
    convs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == blocks and all(c.kernel_size == (3, 3) and c.bias is not None for c in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fold_fine_fusion(model).modules())


def test_fine_fusion_equals_the_unfused_one(model):
    config = model.config
    generator = torch.Generator().manual_seed(2)
    coarse = torch.randn(2, config.hidden_size, 6, 8, generator=generator)
    residuals = [torch.randn(2, channels, 6 * scale, 8 * scale, generator=generator)
                 for channels, scale in zip(config.fine_fusion_dims[1:], (2, 4))]
    with torch.inference_mode():
        expected = model.refinement_layer.forward_pyramid(coarse, residuals)
        got = fold_fine_fusion(model).forward_pyramid(coarse, residuals)
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= REL_TOLERANCE


def test_the_model_is_left_unchanged_and_still_saves_and_loads(tmp_path):
    from transformers import EfficientLoFTRForKeypointMatching
    model = randomise_batch_norms(build_eloftr("tiny", seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_backbone(model), fold_fine_fusion(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.save_pretrained(tmp_path)
    loaded = EfficientLoFTRForKeypointMatching.from_pretrained(str(tmp_path)).state_dict()
    assert all(torch.equal(before[k], loaded[k]) for k in before)


def test_training_mode_is_refused():
    model = build_eloftr("tiny", seed=0).train()
    with pytest.raises(ValueError, match="eval"):
        fold_backbone(model)
    with pytest.raises(ValueError, match="eval"):
        fold_fine_fusion(model)


def test_bf16_autocast_runs_the_folded_backbone():
    """Same precision paths: under bf16 autocast the folded convolutions run in bf16 and
    stay within bf16 rounding of the unfused model's bf16 run."""
    model = randomise_batch_norms(build_eloftr("tiny", seed=0))
    pixels = torch.rand(1, 1, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.efficientloftr.backbone(pixels)
        got = fold_backbone(model)(pixels)
    with torch.inference_mode():
        exact = model.efficientloftr.backbone(pixels)
    for a, b, c in zip(got, expected, exact):
        assert a.dtype == b.dtype == torch.bfloat16
        # The folded run rounds once per block, the unfused one per branch: no worse.
        assert relative_error(a, c) <= max(2 * relative_error(b, c), 0.05)


def matchers(model_dir, **options):
    options = {"device": "cpu", "match_threshold": 0.0, "resize": "native", **options}
    return (EfficientLoFTRStreamMatcher(str(model_dir), reparameterize=True, **options),
            EfficientLoFTRStreamMatcher(str(model_dir), reparameterize=False, **options))


def assert_same_matches(got: dict, expected: dict) -> None:
    assert len(expected["scores"]) > 0
    assert len(got["scores"]) == len(expected["scores"])
    order_got = np.lexsort(np.round(got["keypoints0"] / 8).T)
    order_expected = np.lexsort(np.round(expected["keypoints0"] / 8).T)
    for key in ("keypoints0", "keypoints1"):
        gap = np.abs(got[key][order_got] - expected[key][order_expected]).max()
        assert gap <= POSITION_TOLERANCE, f"{key} moved by {gap} px"
    np.testing.assert_allclose(got["scores"][order_got], expected["scores"][order_expected], rtol=1e-4)


def test_matcher_gives_the_same_matches_on_the_learned_features(saved_dir):
    folded, unfused = matchers(saved_dir)
    assert folded.reparameterized and not unfused.reparameterized
    for shift in ((0, 0), (3, 2)):
        image0 = synthetic_frame(120, 160, seed=0)
        image1 = synthetic_frame(120, 160, seed=0, shift=shift)
        assert_same_matches(folded.match_pair(image0, image1), unfused.match_pair(image0, image1))


class OracleCoarse(EfficientLoFTRStreamMatcher):
    """The model's own backbone residuals and fine fusion (folded or not), with the
    hand-made coarse features of test_eloftr_correctness (zero-padded to the model's
    width), so that many cells match and the fine stage decides the positions."""

    def extract(self, preprocessed):
        features = super().extract(preprocessed)
        pixels = preprocessed[0]
        channels = self.config.hidden_size
        coarse = coarse_features(pixels, self.config.coarse_matching_temperature)
        coarse = coarse * (channels / coarse.shape[1]) ** 0.5  # divided by sqrt(C), C = channels
        coarse = coarse[:, :channels]
        coarse = F.pad(coarse, (0, 0, 0, 0, 0, channels - coarse.shape[1]))
        return FrameFeatures(coarse=coarse, residuals=features.residuals,
                             model_size=features.model_size, source_size=features.source_size)

    def transform(self, features0, features1):
        return features0.coarse, features1.coarse


@pytest.mark.parametrize("motion", ["sub_cell_shift", "rotation_8deg"])
def test_oracle_coarse_matches_and_positions_are_unchanged(saved_dir, motion):
    options = {"device": "cpu", "match_threshold": THRESHOLD, "resize": "native"}
    folded = OracleCoarse(str(saved_dir), reparameterize=True, **options)
    unfused = OracleCoarse(str(saved_dir), reparameterize=False, **options)
    image0, image1 = moved_pair(synthetic_frame(480, 640, seed=3), MOTIONS[motion][0])
    got, expected = folded.match_pair(image0, image1), unfused.match_pair(image0, image1)
    assert len(expected["scores"]) >= 50
    assert_same_matches(got, expected)
