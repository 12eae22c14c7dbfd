"""SuperGlue matches between the published keypoints of consecutive frames (a sparse matcher).

The stream, inputs and outputs are LightGlue's (kp_ros/core/lightglue.py): keypoints
(N, 2) in source pixels, detection scores (N,) and descriptors (N, D) of each frame in,
index pairs into the two frames' keypoint lists out. The model's own SuperPoint
(``keypoint_detector``) is never run.

The arithmetic is ``SuperGlueForKeypointMatching._match_image_pair`` (transformers 5.23)
with the model's own submodules and functions: keypoints normalised by the image size,
the keypoint encoder (position + score) added to the descriptors, the self / cross
attentional GNN, the final projection, scores / sqrt(D), ``log_optimal_transport`` with
the model's dustbin score (``sinkhorn_iterations`` iterations) and mutual nearest
neighbours whose exp(score) is above ``filter_threshold``. Where it differs, deliberately:
each image runs at its own keypoint count. The reference pads the pair to one length
with a mask; the GNN masks padding out, but the optimal transport does not: padded rows
and columns take part in the marginals (normalisation by the padded M + N, dustbin
capacities), so the scores, and at times the matches, of a pair depend on how many
keypoints the *other* image had. With equal counts (no padding) the two agree. See
docs/lightglue.md for the measurement.
Precision: ``bf16`` autocasts the GNN; the optimal transport stays float32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kp_ros.core import params as param_specs
from kp_ros.core.eloftr_params import _number
from kp_ros.core.lightglue import LightGlueStreamMatcher, SparseFeatures, output_settings

_SPEC = {p.name: p for p in param_specs.NODES["superglue_node"]}
PARAM_NAMES = ("filter_threshold", "sinkhorn_iterations", "max_matches",
               "geometric_verification", "ransac_reproj_threshold")


@dataclass(frozen=True)
class SuperGlueParams:
    """Runtime settings; defaults from kp_ros/core/params.py (the core's own where it differs)."""
    filter_threshold: float = _SPEC["filter_threshold"].core_value
    sinkhorn_iterations: int = _SPEC["sinkhorn_iterations"].core_value
    max_matches: int = _SPEC["max_matches"].core_value  # <= 0: unbounded
    geometric_verification: str = _SPEC["geometric_verification"].core_value
    ransac_reproj_threshold: float = _SPEC["ransac_reproj_threshold"].core_value

    def validated(self) -> "SuperGlueParams":
        """The same settings in canonical types, or ValueError naming the first bad one."""
        threshold = _number("filter_threshold", self.filter_threshold, float)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"filter_threshold must be in [0, 1], got {self.filter_threshold!r}")
        iterations = _number("sinkhorn_iterations", self.sinkhorn_iterations, int)
        if not 1 <= iterations <= 1000:
            raise ValueError(f"sinkhorn_iterations must be in [1, 1000], got {self.sinkhorn_iterations!r}")
        return replace(self, filter_threshold=threshold, sinkhorn_iterations=iterations,
                       **output_settings(self))


class SuperGlueStreamMatcher(LightGlueStreamMatcher):
    """``push(keypoints, scores, descriptors, image_size)`` matches each frame's keypoints
    with the previous frame's; ``match_pair`` matches two frames. Numpy at the boundary;
    settings: ``SuperGlueParams``."""

    PARAMS, PARAM_NAMES, TITLE = SuperGlueParams, PARAM_NAMES, "SuperGlue"
    uses_scores = True  # the keypoint encoder takes each keypoint's detection score

    def __init__(self, model: str, device: str = "auto",
                 filter_threshold: float = SuperGlueParams.filter_threshold,
                 sinkhorn_iterations: int = SuperGlueParams.sinkhorn_iterations,
                 max_matches: int = SuperGlueParams.max_matches,
                 geometric_verification: str = SuperGlueParams.geometric_verification,
                 ransac_reproj_threshold: float = SuperGlueParams.ransac_reproj_threshold,
                 fp16: bool = False, precision: str = "fp32"):
        from transformers import SuperGlueForKeypointMatching

        self._setup(SuperGlueForKeypointMatching, model, device, fp16, precision,
                    filter_threshold=filter_threshold, sinkhorn_iterations=sinkhorn_iterations,
                    max_matches=max_matches, geometric_verification=geometric_verification,
                    ransac_reproj_threshold=ransac_reproj_threshold)
        self.descriptor_size = int(self.config.hidden_size)  # descriptors are added to the encoding

    def match_indices(self, frame0: SparseFeatures, frame1: SparseFeatures,
                      params: SuperGlueParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index0, index1, scores) of the mutual matches, any order (see module docstring)."""
        from transformers.models.superglue.modeling_superglue import (log_optimal_transport,
                                                                      normalize_keypoints)
        model = self.model
        height, width = frame0.image_size
        descriptors = []
        for frame in (frame0, frame1):
            keypoints = normalize_keypoints(torch.from_numpy(frame.keypoints).to(self.device)[None],
                                            height, width)
            encoded = model.keypoint_encoder(keypoints, frame.scores[None])[0]
            descriptors.append(frame.descriptors[None] + encoded)
        with self._autocast():
            for layer, kind in zip(model.gnn.layers, model.gnn.layers_types):
                sources = descriptors[::-1] if kind == "cross" else (None, None)
                descriptors = [d + layer(d, encoder_hidden_states=source)[0]
                               for d, source in zip(descriptors, sources)]
            projected = [model.final_projection(d) for d in descriptors]
        scores = projected[0].float() @ projected[1].float().transpose(1, 2)
        scores = scores / self.config.hidden_size ** 0.5
        scores = log_optimal_transport(scores, model.bin_score, iterations=params.sinkhorn_iterations)
        best0, best1 = scores[0, :-1, :-1].max(1), scores[0, :-1, :-1].max(0)
        rows = torch.arange(len(best0.indices), device=self.device)
        matching = best0.values.exp()
        keep = (best1.indices[best0.indices] == rows) & (matching > params.filter_threshold)
        return rows[keep], best0.indices[keep], matching[keep]
