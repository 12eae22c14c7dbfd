"""The channels_last local feature transformer (kp_ros/core/eloftr_transformer.py) against
transformers' EfficientLoFTRLocalFeatureTransformer: the same maps up to float rounding,
with either MLP product form (kp_ros/core/eloftr_mlp.py), in fp32 and under bf16 autocast."""
from __future__ import annotations

import pytest
import torch

from kp_ros.core.eloftr_transformer import ChannelsLastTransformer
from kp_ros.core.random_init import build_eloftr


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


@pytest.fixture(scope="module", params=["tiny", "full"])
def model(request):
    return build_eloftr(request.param, seed=0).eval()


def coarse_pair(model, height=8, width=12, seed=0):
    """Two coarse maps (2, C, h, w) and one frame's rotary embeddings (1, L, C), as the matcher builds them."""
    channels = model.config.hidden_size
    maps = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(seed))
    cos, sin = model.efficientloftr.rotary_emb(maps)
    return maps, (cos.reshape(1, -1, channels), sin.reshape(1, -1, channels))


def reference(model, maps, embeddings):
    channels, height, width = maps.shape[1:]
    transformer = model.efficientloftr.local_feature_transformer
    out = transformer(maps.reshape(1, 2, channels, height, width),
                      position_embeddings=tuple(embedding.expand(2, -1, -1) for embedding in embeddings))
    return out[0]


def channels_last_transformer(model, form, maps, embeddings):
    """Both parts, as the matcher runs them: each frame's first self-attention, then the rest."""
    transformer = ChannelsLastTransformer(model, form)
    first, second = transformer(*(transformer.attend_self(frame, embeddings) for frame in (maps[:1], maps[1:])),
                                embeddings)
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert second.is_contiguous(memory_format=torch.channels_last)
    return torch.cat([first, second])


@pytest.mark.parametrize("form", ["linear", "pointwise_conv"])
def test_equals_transformers_transformer(model, form):
    maps, embeddings = coarse_pair(model)
    with torch.inference_mode():
        expected = reference(model, maps, embeddings)
        got = channels_last_transformer(model, form, maps, embeddings)
    assert got.shape == expected.shape == maps.shape
    assert relative_error(got, expected) <= 1e-5, relative_error(got, expected)


def test_the_layers_are_shared_not_copied(model):
    transformer = ChannelsLastTransformer(model, "linear")
    assert transformer.layers is model.efficientloftr.local_feature_transformer.layers


def test_bf16_autocast_stays_within_bf16_rounding(model):
    maps, embeddings = coarse_pair(model, seed=1)
    with torch.inference_mode():
        exact = reference(model, maps, embeddings)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = reference(model, maps, embeddings)
            got = channels_last_transformer(model, "pointwise_conv", maps, embeddings)
    assert relative_error(got, exact) <= max(2 * relative_error(expected, exact), 0.05)
