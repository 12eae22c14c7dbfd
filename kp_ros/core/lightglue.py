"""LightGlue matches between the published keypoints of consecutive frames (a sparse matcher).

Input: what superpoint_node publishes for each frame (keypoints (N, 2) in source pixels,
scores, descriptors (N, D)) and the frame's size; output: index pairs into the two
frames' keypoint lists, with their positions and scores. No image, no backbone: the
transformers model's own SuperPoint (``keypoint_detector``) is never run.

The arithmetic is ``LightGlueForKeypointMatching._match_image_pair`` (transformers 5.23)
for one pair, with the model's own submodules: keypoints normalised by the image size,
input projection, rotary positional encoding, per layer self + cross attention (both
images padded to one length, with the reference's attention mask), early stop
(``depth_confidence``: token confidence per layer), point pruning (``width_confidence``:
matchability per layer), the double-softmax assignment of the layer it stops at and
mutual nearest neighbours above ``filter_threshold``. Where it differs, deliberately:
  - ``depth_confidence = 0`` with pruning on, or ``width_confidence = 0`` with early stop
    on, are handled as in the original LightGlue (cvg/LightGlue); the reference crashes
    (pruning reads the token confidences it never computed) or returns nothing (it
    matches the emptied batch after an early stop). See docs/lightglue.md.
  - after pruning, the reference maps matches back through index lists padded with -1,
    so a padded slot writes into the last keypoint's entry; here only real rows map back.
  - keypoints keep their order and float positions (the reference re-runs SuperPoint,
    whose keypoints are integer model pixels in raster order); results are sorted by
    descending score, ``max_matches`` keeps the top k.
Precision: ``bf16`` autocasts the transformer layers; the assignment, confidences and
matchability stay float32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from kp_ros.core import params as param_specs
from kp_ros.core.eloftr_params import _number
from kp_ros.core.geometry import verify_matches
from kp_ros.core.model_loading import load_pretrained, resolve_device
from kp_ros.core.precision import resolve_precision, warn_once

_SPEC = {p.name: p for p in param_specs.NODES["lightglue_node"]}
PARAM_NAMES = ("filter_threshold", "depth_confidence", "width_confidence", "max_matches",
               "geometric_verification", "ransac_reproj_threshold")


@dataclass(frozen=True)
class LightGlueParams:
    """Runtime settings; defaults from kp_ros/core/params.py (the core's own where it differs)."""
    filter_threshold: float = _SPEC["filter_threshold"].core_value
    depth_confidence: float = _SPEC["depth_confidence"].core_value  # 0: every layer
    width_confidence: float = _SPEC["width_confidence"].core_value  # 0: no pruning
    max_matches: int = _SPEC["max_matches"].core_value  # <= 0: unbounded
    geometric_verification: str = _SPEC["geometric_verification"].core_value
    ransac_reproj_threshold: float = _SPEC["ransac_reproj_threshold"].core_value

    def validated(self) -> "LightGlueParams":
        """The same settings in canonical types, or ValueError naming the first bad one."""
        values = {}
        for name in ("filter_threshold", "depth_confidence", "width_confidence"):
            value = _number(name, getattr(self, name), float)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
            values[name] = value
        return replace(self, **values, **output_settings(self))


def output_settings(params) -> dict:
    """The sparse matchers' shared settings (top-k, verification) checked: canonical
    values, or ValueError naming the first bad one."""
    if params.geometric_verification not in param_specs.VERIFICATION_CHOICES:
        raise ValueError(f"geometric_verification must be one of "
                         f"{param_specs.VERIFICATION_CHOICES}, got {params.geometric_verification!r}")
    reproj = _number("ransac_reproj_threshold", params.ransac_reproj_threshold, float)
    if not reproj > 0:
        raise ValueError(f"ransac_reproj_threshold must be > 0 pixels, got {reproj!r}")
    return {"max_matches": _number("max_matches", params.max_matches, int),
            "ransac_reproj_threshold": reproj}


@dataclass
class SparseFeatures:
    """One frame's keypoints as the matcher keeps them (the older frame of the next pair)."""
    keypoints: np.ndarray    # (N, 2) float32 source pixels
    descriptors: torch.Tensor  # (N, D) float32 on the device
    image_size: tuple[int, int]  # (H, W)
    scores: torch.Tensor | None = None  # (N,) float32 on the device, for a matcher that uses them


def empty_result() -> dict[str, np.ndarray]:
    return {"keypoints0": np.zeros((0, 2), np.float32), "keypoints1": np.zeros((0, 2), np.float32),
            "scores": np.zeros(0, np.float32), "inliers": np.zeros(0, np.uint8),
            "index0": np.zeros(0, np.int32), "index1": np.zeros(0, np.int32)}


class LightGlueStreamMatcher:
    """``push(keypoints, scores, descriptors, image_size)`` matches each frame's keypoints
    with the previous frame's; ``match_pair`` matches two frames. Numpy at the boundary;
    settings: ``LightGlueParams``."""

    sparse = True  # matches a detector's keypoints, not images (pipeline.match_keypoints)
    PARAMS, PARAM_NAMES, TITLE = LightGlueParams, PARAM_NAMES, "LightGlue"
    uses_scores = False  # LightGlue ignores the detection scores

    def __init__(self, model: str, device: str = "auto",
                 filter_threshold: float = LightGlueParams.filter_threshold,
                 depth_confidence: float = LightGlueParams.depth_confidence,
                 width_confidence: float = LightGlueParams.width_confidence,
                 max_matches: int = LightGlueParams.max_matches,
                 geometric_verification: str = LightGlueParams.geometric_verification,
                 ransac_reproj_threshold: float = LightGlueParams.ransac_reproj_threshold,
                 fp16: bool = False, precision: str = "fp32"):
        from transformers import LightGlueForKeypointMatching

        self._setup(LightGlueForKeypointMatching, model, device, fp16, precision,
                    filter_threshold=filter_threshold, depth_confidence=depth_confidence,
                    width_confidence=width_confidence, max_matches=max_matches,
                    geometric_verification=geometric_verification,
                    ransac_reproj_threshold=ransac_reproj_threshold)
        self.descriptor_size = int(self.config.keypoint_detector_config.descriptor_decoder_dim)

    def _setup(self, model_class, model: str, device: str, fp16: bool, precision: str,
               **settings) -> None:
        """Settings checked first, then the checkpoint loaded (shared by the sparse matchers)."""
        self.device = resolve_device(device)
        self.params = self.PARAMS()
        self.camera = None  # geometry.CameraModel for 'essential' (the node sets it)
        self.set_params(**settings)
        self.precision = resolve_precision(precision, self.device, fp16)
        warn_once(self.precision)
        self.model_id = str(model)
        self.model = load_pretrained(model_class, model).to(self.device).eval()
        self.config = self.model.config
        self._previous: SparseFeatures | None = None

    def set_params(self, **changes) -> None:
        """Change settings (None keeps one; names as LightGlueParams); all are checked
        before any applies, effective from the next pair."""
        unknown = set(changes) - set(self.PARAM_NAMES)
        if unknown:
            raise ValueError(f"unknown {self.TITLE} setting(s): {', '.join(sorted(unknown))}")
        changes = {k: v for k, v in changes.items() if v is not None}
        self.params = replace(self.params, **changes).validated()  # one swap

    def reset(self) -> None:
        """Forget the previous frame: the next push starts a new pair."""
        self._previous = None

    def features(self, keypoints, descriptors, image_size, scores=None) -> SparseFeatures:
        """Numpy keypoints (N, 2), descriptors (N, D) and, for a matcher that uses them,
        detection scores (N,) -> the matcher's frame, or ValueError."""
        keypoints = np.ascontiguousarray(np.asarray(keypoints, np.float32).reshape(-1, 2))
        descriptors = np.asarray(descriptors, np.float32)
        if not len(keypoints):  # an empty frame: any empty descriptor block
            descriptors = descriptors.reshape(0, self.descriptor_size)
        if descriptors.shape != (len(keypoints), self.descriptor_size):
            raise ValueError(f"descriptors must be ({len(keypoints)}, {self.descriptor_size}) for "
                             f"{len(keypoints)} keypoints, got {descriptors.shape}")
        if not (np.isfinite(keypoints).all() and np.isfinite(descriptors).all()):
            raise ValueError("keypoints and descriptors must be finite")
        height, width = (int(v) for v in image_size)
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size must be positive (height, width), got {image_size!r}")
        if self.uses_scores:
            scores = np.ascontiguousarray(np.asarray(scores, np.float32).reshape(-1))
            if scores.shape != (len(keypoints),) or not np.isfinite(scores).all():
                raise ValueError(f"scores must be {len(keypoints)} finite values, got {scores.shape}")
            scores = torch.from_numpy(scores).to(self.device)
        else:
            scores = None
        return SparseFeatures(keypoints, torch.from_numpy(np.ascontiguousarray(descriptors))
                              .to(self.device), (height, width), scores)

    @torch.inference_mode()
    def push(self, keypoints, scores, descriptors, image_size) -> dict[str, np.ndarray] | None:
        """Match this frame with the previous one. None for the first frame after a reset
        or when the image size changed (the stream restarts there); else ``match_pair``'s
        result with ``keypoints0`` / ``index0`` in the previous frame. ``scores``: the
        detection scores (LightGlue ignores them, SuperGlue encodes them)."""
        params = self.params
        frame = self.features(keypoints, descriptors, image_size, scores)
        previous, self._previous = self._previous, frame
        if previous is None or previous.image_size != frame.image_size:
            return None
        return self.match_features(previous, frame, params)

    @torch.inference_mode()
    def match_pair(self, features0: dict, features1: dict,
                   image_size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Matches between two detector outputs (dicts with 'keypoints', 'descriptors' and,
        for SuperGlue, 'scores') of
        frames of ``image_size`` (H, W), without touching the stream. Numpy, descending
        score: keypoints0/keypoints1 (M, 2) float32, scores (M,), index0/index1 (M,) int32
        keypoint indices, inliers (M,) uint8 (empty when not verified)."""
        return self.match_features(*(
            self.features(f["keypoints"], f["descriptors"], image_size, f.get("scores"))
            for f in (features0, features1)))

    def match_features(self, frame0: SparseFeatures, frame1: SparseFeatures,
                       params: LightGlueParams | None = None) -> dict[str, np.ndarray]:
        params = params or self.params
        if frame0.image_size != frame1.image_size:
            raise ValueError(f"frames of different sizes {frame0.image_size} and {frame1.image_size}")
        if not len(frame0.keypoints) or not len(frame1.keypoints):
            return empty_result()
        index0, index1, scores = self.match_indices(frame0, frame1, params)
        order = torch.argsort(scores, descending=True, stable=True)
        if params.max_matches > 0:
            order = order[:params.max_matches]
        index0, index1 = index0[order].cpu().numpy(), index1[order].cpu().numpy()
        keypoints0, keypoints1 = frame0.keypoints[index0], frame1.keypoints[index1]
        inliers = np.zeros(0, np.uint8)
        if params.geometric_verification != "none":
            inliers = verify_matches(keypoints0, keypoints1, params.geometric_verification,
                                     params.ransac_reproj_threshold, self.camera)
        return {"keypoints0": keypoints0, "keypoints1": keypoints1,
                "scores": scores[order].float().cpu().numpy(), "inliers": inliers,
                "index0": index0.astype(np.int32), "index1": index1.astype(np.int32)}

    # -- the network ------------------------------------------------------------------

    def match_indices(self, frame0: SparseFeatures, frame1: SparseFeatures,
                      params: LightGlueParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index0, index1, scores) of the mutual matches, any order (see module docstring)."""
        from transformers.models.lightglue.modeling_lightglue import normalize_keypoints

        model = self.model
        height, width = frame0.image_size
        lengths = (len(frame0.keypoints), len(frame1.keypoints))
        keypoints = _padded([torch.from_numpy(frame0.keypoints).to(self.device),
                             torch.from_numpy(frame1.keypoints).to(self.device)])
        descriptors = _padded([frame0.descriptors, frame1.descriptors])
        mask = _padded([torch.ones(n, dtype=torch.int, device=self.device) for n in lengths])
        indices = [torch.arange(n, device=self.device) for n in lengths]  # rows -> keypoints
        keypoints = normalize_keypoints(keypoints, height, width)
        with self._autocast():
            descriptors = model.input_projection(descriptors.contiguous())
        encoding = model.positional_encoder(keypoints)[0]  # (cos, sin)
        early_stop, pruning = params.depth_confidence > 0, params.width_confidence > 0
        last = model.num_layers - 1
        for layer in range(model.num_layers):
            with self._autocast():
                descriptors = model.transformer_layers[layer](
                    descriptors, encoding, attention_mask=self._attention_mask(descriptors, mask))[0]
            if layer == last:
                break
            confidences = None
            if early_stop:
                confidences = model.token_confidence[layer](descriptors.float())
                if self._confident(confidences, mask, layer, params.depth_confidence):
                    break
            if pruning:
                descriptors, encoding, mask, indices = self._prune(
                    descriptors, encoding, mask, indices, confidences, layer, params)
        return self._assign(descriptors.float(), mask, indices, layer, params.filter_threshold)

    def _attention_mask(self, descriptors: torch.Tensor, mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask
        return create_bidirectional_mask(config=self.config, inputs_embeds=descriptors[:, 0:1, :],
                                         attention_mask=mask, allow_is_bidirectional_skip=False)

    def _confident(self, confidences, mask, layer: int, depth_confidence: float) -> bool:
        """The reference's early-stop test: the share of confident keypoints of the pair."""
        threshold = self.model._get_confidence_threshold(layer)
        unsure = (confidences.masked_fill(mask == 0, 1) < threshold).float().sum()
        return bool(1.0 - unsure / mask.sum() > depth_confidence)

    def _prune(self, descriptors, encoding, mask, indices, confidences, layer, params):
        """Keep each image's matchable (or not yet confident) keypoints, re-padded."""
        matchability = self.model.match_assignment_layers[layer].get_matchability(descriptors.float())
        keep = matchability > (1 - params.width_confidence)
        if confidences is not None:  # low-confidence points are never pruned
            keep |= confidences <= self.model._get_confidence_threshold(layer)
        keep &= mask.bool()
        rows = [torch.nonzero(keep[i])[:, 0] for i in range(2)]
        descriptors = _padded([descriptors[i, r] for i, r in enumerate(rows)])
        encoding = tuple(_padded([part[i, r] for i, r in enumerate(rows)]) for part in encoding)
        mask = _padded([mask[i, r] for i, r in enumerate(rows)])
        return descriptors, encoding, mask, [indices[i][r] for i, r in enumerate(rows)]

    def _assign(self, descriptors, mask, indices, layer: int, threshold: float):
        from transformers.models.lightglue.modeling_lightglue import get_matches_from_scores
        scores = self.model.match_assignment_layers[layer](descriptors, mask)
        matches, matching_scores = get_matches_from_scores(scores, threshold)
        row_matches = matches[0, :len(indices[0])]  # rows beyond are padding
        rows = torch.nonzero((row_matches > -1) & (row_matches < len(indices[1])))[:, 0]
        columns = row_matches[rows]
        return indices[0][rows], indices[1][columns], matching_scores[0, rows]

    def _autocast(self):
        return self.precision.autocast(self.device)


def _padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """Two (n_i, ...) tensors -> (2, max n, ...), zero-padded at the end."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
