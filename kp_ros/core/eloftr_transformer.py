"""EfficientLoFTR's local feature transformer with every map in channels_last.

The same layers, weights and order of operations as transformers'
EfficientLoFTRLocalFeatureTransformer (self-attention on both frames, then cross-attention
of frame 0 with frame 1 and of frame 1 with the updated frame 0, as the original), only the
memory layout and the MLP's first product differ: transformers keeps NCHW maps and permutes
to (B, H, W, C) around every norm and MLP, so each layer copies its maps several times (the
MLP input twice: the concatenation, then a contiguous copy), and its 4x4 max pooling runs
on NCHW, ~13x slower than on channels_last on CPU. In channels_last those permutes are
views, and the pooling and the depthwise aggregation read the layout their kernels want;
the MLP takes the attended maps before their upsampling, with no concatenation
(``split_input_mlp``, kp_ros/core/eloftr_mlp.py). Equal to transformers' module up to float
rounding (test/test_eloftr_transformer.py).
"""
from __future__ import annotations

import torch

from kp_ros.core.eloftr_mlp import split_input_mlp


class ChannelsLastTransformer(torch.nn.Module):
    """The layers (shared, not copied) of ``model.efficientloftr.local_feature_transformer``
    on channels_last maps, the MLP products in ``mlp_form`` (kp_ros/core/eloftr_mlp.py), in
    two parts: ``attend_self`` (the first layer's self-attention, which reads one frame
    alone, so a stream runs it once per frame) and ``forward`` (the rest, on both frames)."""

    def __init__(self, model: torch.nn.Module, mlp_form: str):
        super().__init__()
        self.layers = model.efficientloftr.local_feature_transformer.layers
        self.mlp_form = mlp_form

    def attend_self(self, maps: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One frame's maps (1, C, h, w) and its (cos, sin) (1, h/4 * w/4, C) -> (1, C, h, w)
        channels_last, after the first layer's self-attention."""
        maps = maps.contiguous(memory_format=torch.channels_last)
        return aggregated_attention(self.layers[0].self_attention, maps, self.mlp_form, None, position_embeddings)

    def forward(self, first: torch.Tensor, second: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both frames after ``attend_self`` (each (1, C, h, w) channels_last) and their
        (cos, sin) -> both frames' (1, C, h, w) channels_last, as transformers' module on the two."""
        # One frame at a time, self-attention included (it is per frame): a batch of two
        # doubles every intermediate map, and at 1920x1080 the MLP's (2, I, h, w) hidden
        # maps (128 MiB each) are above cpu_heap's mmap threshold, so each is a fresh
        # mapping that page-faults in (under torch's profiler those ops took about twice
        # the time per cell of one frame's; end to end the step's peak memory fell, its
        # time within the machine's noise).
        for index, layer in enumerate(self.layers):
            if index:
                first = aggregated_attention(layer.self_attention, first, self.mlp_form, None, position_embeddings)
                second = aggregated_attention(layer.self_attention, second, self.mlp_form, None, position_embeddings)
            first = aggregated_attention(layer.cross_attention, first, self.mlp_form, second)
            second = aggregated_attention(layer.cross_attention, second, self.mlp_form, first)
        return first, second


def aggregated_attention(block: torch.nn.Module, maps: torch.Tensor, mlp_form: str,
                         source: torch.Tensor | None = None,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """transformers' EfficientLoFTRAggregatedAttention.forward on channels_last maps:
    queries aggregated from ``maps`` (depthwise strided conv), keys / values pooled from
    ``source`` (``maps`` for self-attention), attention at the aggregated size, then the
    MLP on [maps, upsampled attended] (products in ``mlp_form``) and the residual."""
    batch, channels = maps.shape[:2]
    aggregation = block.aggregation
    queries = aggregation.q_aggregation(maps)
    keys = aggregation.kv_aggregation(maps if source is None else source)
    queries = aggregation.norm(queries.permute(0, 2, 3, 1))  # channels_last: (B, h, w, C) views
    keys = aggregation.norm(keys.permute(0, 2, 3, 1))
    height, width = queries.shape[1:3]
    attended, _ = block.attention(queries.reshape(batch, -1, channels), keys.reshape(batch, -1, channels),
                                  position_embeddings=position_embeddings)
    attended = attended.reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # channels_last
    mlp = split_input_mlp(block.mlp, maps, attended, block.q_aggregation_kernel_size, mlp_form)
    return maps + mlp.permute(0, 3, 1, 2)
