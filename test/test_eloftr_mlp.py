"""The transformer MLP as kp_ros runs it (kp_ros/core/eloftr_mlp.py) against transformers'
own EfficientLoFTRMLP: the installed forward on the permuted (B, H, W, 2C) view
transformers hands it, and the split-input MLP (either product form) on maps and attended
maps before their upsampling; the same function up to float rounding, in fp32 and under
bf16 autocast."""
from __future__ import annotations

import copy

import pytest
import torch

from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher
from kp_ros.core.eloftr_mlp import MLP_CLASS, install_mlp_forward, mlp_form, split_input_mlp
from kp_ros.core.random_init import build_eloftr


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


def mlps(model):
    return [m for m in model.modules() if type(m).__name__ == MLP_CLASS]


@pytest.fixture(scope="module")
def model():
    return build_eloftr("tiny", seed=0).eval()


def permuted_input(model, seed=0):
    """As transformers builds it: cat of two NCHW maps along channels, permuted to NHWC."""
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    maps = torch.cat([torch.randn(2, hidden, 6, 10, generator=generator),
                      torch.randn(2, hidden, 6, 10, generator=generator)], dim=1)
    return maps.permute(0, 2, 3, 1)


def test_installed_forward_equals_transformers_mlp(model):
    states = permuted_input(model)
    reference = mlps(model)[0]
    changed = copy.deepcopy(model)
    assert install_mlp_forward(changed) == len(mlps(model)) > 0
    with torch.inference_mode():
        expected = reference(states)
        got = mlps(changed)[0](states)
    assert got.shape == expected.shape == (2, 6, 10, model.config.hidden_size)
    assert got.dtype == expected.dtype == torch.float32
    assert relative_error(got, expected) <= 1e-5
    # The model's weights are untouched: the form is a forward, not saved with the model.
    assert all(torch.equal(a, b) for a, b in zip(changed.state_dict().values(), model.state_dict().values()))


def split_inputs(model, seed=0, height=8, width=12, scale=4):
    """channels_last maps (2, C, H, W) and attended maps at 1 / scale, as the transformer has them."""
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(2, hidden, height, width, generator=generator)
    attended = torch.randn(2, hidden, height // scale, width // scale, generator=generator)
    return (maps.contiguous(memory_format=torch.channels_last),
            attended.contiguous(memory_format=torch.channels_last))


def concatenated(maps, attended, scale=4):
    """transformers' MLP input: [maps, upsampled attended], permuted to (B, H, W, 2C)."""
    upsampled = torch.nn.functional.interpolate(attended, scale_factor=scale, mode="bilinear", align_corners=False)
    return torch.cat([maps, upsampled], dim=1).permute(0, 2, 3, 1)


@pytest.mark.parametrize("form", ["linear", "pointwise_conv"])
def test_split_input_mlp_equals_transformers_mlp_on_the_concatenation(model, form):
    maps, attended = split_inputs(model)
    mlp = mlps(model)[0]
    with torch.inference_mode():
        expected = mlp(concatenated(maps, attended))
        got = split_input_mlp(mlp, maps, attended, 4, form)
    assert got.shape == expected.shape == (2, 8, 12, model.config.hidden_size)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert relative_error(got, expected) <= 1e-5, relative_error(got, expected)


def test_split_input_mlp_keeps_fc1_bias_through_the_upsampling(model):
    """transformers' fc1 has no bias; a Linear with one must give the same function too."""
    maps, attended = split_inputs(model, seed=2)
    mlp = copy.deepcopy(mlps(model)[0])
    mlp.fc1.bias = torch.nn.Parameter(torch.randn(mlp.fc1.out_features, generator=torch.Generator().manual_seed(3)))
    with torch.inference_mode():
        expected = mlp(concatenated(maps, attended))
        for form in ("linear", "pointwise_conv"):
            assert relative_error(split_input_mlp(mlp, maps, attended, 4, form), expected) <= 1e-5


@pytest.mark.parametrize("form", ["linear", "pointwise_conv"])
def test_split_input_mlp_runs_in_bf16_under_autocast(model, form):
    maps, attended = split_inputs(model, seed=1)
    mlp = mlps(model)[0]
    with torch.inference_mode():
        exact = mlp(concatenated(maps, attended))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = mlp(concatenated(maps, attended))
            got = split_input_mlp(mlp, maps, attended, 4, form)
    assert got.dtype == expected.dtype
    # Both products in bf16 (LayerNorm in float32): no further from fp32 than transformers' bf16 run.
    assert relative_error(got, exact) <= max(2 * relative_error(expected, exact), 0.05)


def test_the_form_is_decided_by_the_device():
    assert mlp_form("cuda") == mlp_form("cuda:1") == "linear"
    assert mlp_form("cpu") == ("pointwise_conv" if torch.backends.mkldnn.is_available() else "linear")


def test_matchers_take_the_form_of_their_options(tiny_eloftr_dir):
    folded = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu")
    unfolded = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", reparameterize=False)
    assert folded.mlp_form == mlp_form("cpu")
    assert unfolded.mlp_form == "linear"  # transformers' Linear layers: the reference, bit for bit
