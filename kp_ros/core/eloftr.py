"""EfficientLoFTR matches between consecutive frames of a stream, on the transformers weights.

The pipeline (Wang et al., CVPR 2024), each step a method so it can be timed or swapped:
  1. ``extract``: RepVGG backbone, per image -> coarse (1/8) and residual (1/4, 1/2) maps.
     The only per-image stage, so ``push`` runs it once per frame and keeps the result
     for the next pair.
  2. ``transform``: self- then cross-attention over both coarse maps (rotary positions).
  3. ``match_coarse``: dual-softmax confidence, threshold, border removal, mutual nearest
     neighbours -> one (i, j) cell pair per correspondence, in blocks of rows (memory
     linear in the cells, eloftr_ops.mutual_nearest).
  4. ``fine_windows``: fuse the attended coarse map with the residuals into full-res
     features (``fine_maps``, or only on tiles around the matched cells when that is
     less work: kp_ros/core/eloftr_fine_tiles.py) and cut each pair's windows: the 8x8
     window of cell i in the older frame, the 10x10 window of cell j in the newer one.
  5. ``refine_windows``: pixel-level argmax between the two windows, then a 3x3
     sub-pixel expectation in the newer frame.

Why not ``model(pixel_values)`` + ``post_process_keypoint_matching`` (transformers 5.23):
  - ``_get_matches_from_scores`` writes "for each image-1 cell p, its image-0 match i(p)"
    and "for each image-0 cell p, its image-1 match j(p)" into one tensor slot by slot,
    so slot p pairs i(p) with j(p): two different correspondences unless the motion maps
    p to itself. Fine windows are gathered and keypoints returned with that layout.
  - The fine stage takes its dual softmax over (matches, window-0 pixels) instead of the
    two windows, and gathers the stage-1 offsets along the match axis: every match gets
    the offset of window pixel 0, i.e. no pixel-level refinement. It also scales stage-1
    features by sqrt(C - slice) where the original uses sqrt(C).
  - The post-process truncates coordinates to int; batches > 1 mix pairs.
Here each correspondence is one (i, j) pair read off the mutual-NN mask, and the fine
stage is the original EfficientLoFTR's (``fine_matching``, kp_ros/core/eloftr_ops.py). With
``reparameterize=False, coarse_chunk_bytes=0`` everything up to the fine windows is the
reference's own arithmetic, bit for bit (see test/test_eloftr.py); by default the
convolutions run re-parameterised (BatchNorms folded, kp_ros/core/eloftr_fold.py) and the
coarse matching without the (h/8 w/8)^2 matrix, equal up to float rounding
(test/test_eloftr_fold.py, test/test_eloftr_linear.py).

Coordinates follow EfficientLoFTR's convention (the fine window of cell c, pixels
[8c, 8c+8), is read as centred on the cell's coarse point 8c: the trained features are
aligned that way), as floats in source pixels. ``match_threshold`` replaces both the
model's ``coarse_matching_threshold`` and the post-process threshold.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from kp_ros.core.device_placement import apply_memory_format, apply_weights_dtype, placement
from kp_ros.core.eloftr_fine_tiles import TilePlan, full_map_macs, host_ids, tile_macs_bounds, tile_windows
from kp_ros.core.eloftr_fold import fold_backbone, fold_fine_fusion
from kp_ros.core.eloftr_mlp import install_mlp_forward, mlp_form
from kp_ros.core.eloftr_transformer import ChannelsLastTransformer
from kp_ros.core.eloftr_ops import (cell_xy, cut_windows, fine_matching, inner_cells, mutual_nearest,
                                   whole_matrix_fits)
from kp_ros.core.eloftr_params import EfficientLoFTRParams
from kp_ros.core.geometry import verify_matches
from kp_ros.core.model_loading import load_pretrained, resolve_device
from kp_ros.core.precision import resolve_precision, warn_once
from kp_ros.core.preprocess import preprocess_gray, scale_to_source, target_size

SIZE_MULTIPLE = 32  # the backbone (1/8) and the 4x4 attention aggregation need H, W % 32 == 0
# The fine pyramid on tiles of FINE_TILE_CELLS x FINE_TILE_CELLS coarse cells (those that
# hold a matched cell, with their halos) instead of on the whole maps when the tiles'
# convolution work times TILE_WORK_RATIO is below the whole maps'. Measured by
# bench/bench_eloftr_fine.py (full-size model, CPU): the tiles' time is their work share
# times ~0.9-1.2 (crops, gathers and small batches against the unpadded convolutions), so
# the cross-over is at ~0.85-1x the work; up to 1x the tiles still save most of the
# memory (a few hundred MB at most, against the maps' GBs at 1920x1080). 4 cells: small halos' overhead
# against little area wasted around scattered cells (2 is better for isolated cells,
# 8-16 for large clusters).
FINE_TILE_CELLS = 4
TILE_WORK_RATIO = 1.0


@dataclass
class FrameFeatures:
    """Backbone output of one frame: what can be reused when it becomes the older frame."""
    coarse: torch.Tensor                 # (1, C, h/8, w/8)
    residuals: tuple[torch.Tensor, ...]  # backbone maps at 1/2 and 1/4, in that order
    model_size: tuple[int, int]          # (h, w) the model ran at
    source_size: tuple[int, int]         # (H, W) of the image given
    # ``coarse`` after the transformer's first self-attention, which reads this frame alone:
    # run once per frame (by ``extract``), not again when the frame is the older one. None:
    # run when the frame is matched (transformers' own transformer always runs it there).
    self_attended: torch.Tensor | None = None


@dataclass
class CoarseMatches:
    """Mutual-NN cell pairs: cell ``i_ids[k]`` of the older frame <-> ``j_ids[k]`` of the newer."""
    i_ids: torch.Tensor   # (M,) int64, flat index into the (h/8, w/8) grid
    j_ids: torch.Tensor   # (M,)
    scores: torch.Tensor  # (M,) dual-softmax confidence


def empty_result() -> dict[str, np.ndarray]:
    return {"keypoints0": np.zeros((0, 2), np.float32), "keypoints1": np.zeros((0, 2), np.float32),
            "scores": np.zeros(0, np.float32), "inliers": np.zeros(0, np.uint8)}


class EfficientLoFTRStreamMatcher:
    """Matches each pushed frame against the previous one, reusing its backbone features.
    Results are numpy arrays (tensors stay inside); settings: ``EfficientLoFTRParams``."""

    def __init__(self, model: str, device: str = "auto",
                 match_threshold: float = EfficientLoFTRParams.match_threshold,
                 max_matches: int = EfficientLoFTRParams.max_matches,
                 resize: str = EfficientLoFTRParams.resize,
                 geometric_verification: str = EfficientLoFTRParams.geometric_verification,
                 ransac_reproj_threshold: float = EfficientLoFTRParams.ransac_reproj_threshold,
                 fp16: bool = False, precision: str = "fp32", reparameterize: bool = True,
                 coarse_chunk_bytes: int | None = None, fine_tile_cells: int = FINE_TILE_CELLS):
        from transformers import EfficientLoFTRForKeypointMatching

        self._device = resolve_device(device)
        self.params = EfficientLoFTRParams()
        # The camera's calibration (geometry.CameraModel) for 'essential' verification;
        # None: 'essential' runs as 'fundamental'. Set by the node from camera_info.
        self.camera = None
        self.set_params(match_threshold=match_threshold, max_matches=max_matches, resize=resize,
                        geometric_verification=geometric_verification,
                        ransac_reproj_threshold=ransac_reproj_threshold)
        # Reduced precision (autocast) in the backbone, the attention and the fine fusion
        # (the convolutions and matmuls); the dual softmaxes, the fine refinement and the
        # coordinates stay float32 (see kp_ros/core/precision.py, test/test_precision.py).
        self.precision = resolve_precision(precision, self._device, fp16)
        warn_once(self.precision)
        self._fp16 = self.precision.dtype == torch.float16
        self._model_id = str(model)
        self.model = load_pretrained(EfficientLoFTRForKeypointMatching, model).to(self._device).eval()
        self.config = self.model.config
        # Inference form of the convolutions (kp_ros/core/eloftr_fold.py): each RepVGG block
        # one 3x3 conv, BatchNorms folded; equal to the model's up to float rounding.
        # False: transformers' own modules, bit for bit (the reference-parity tests).
        self.reparameterized = bool(reparameterize)
        self._backbone = self.model.efficientloftr.backbone
        self._fine_fusion = self.model.refinement_layer
        self._transformer = None  # None: transformers' own local feature transformer
        if self.reparameterized:
            self._backbone, self._fine_fusion = fold_backbone(self.model), fold_fine_fusion(self.model)
            # and the transformer's maps in channels_last (kp_ros/core/eloftr_transformer.py),
            # its MLP products as 1x1 convolutions on a CPU with oneDNN (kp_ros/core/eloftr_mlp.py).
            self.mlp_form = mlp_form(self._device)
            self._transformer = ChannelsLastTransformer(self.model, self.mlp_form)
        else:
            # transformers' transformer, its Linear layers on contiguous input (bit for bit in fp32).
            self.mlp_form = "linear"
            install_mlp_forward(self.model)
        # Coarse matching memory: None blocks a large similarity matrix by memory
        # (eloftr_ops.whole_matrix_fits, chunk_rows), N bytes per block; 0 materialises the whole (h/8 w/8)^2
        # matrix as the reference does (bit for bit; 4.2 GB per matrix at 1920x1080).
        self.coarse_chunk_bytes = coarse_chunk_bytes
        # Fine pyramid on tiles of this many coarse cells a side where that is cheaper
        # (``fine_tile_plan``); 0: always the whole maps. Folded fine fusion only.
        if int(fine_tile_cells) < 0:
            raise ValueError(f"fine_tile_cells must be >= 0, got {fine_tile_cells}")
        self.fine_tile_cells = int(fine_tile_cells)
        # kp_ros/core/device_placement.py: on CUDA under fp16 / bf16, low-precision weights cast
        # once here, not by autocast every frame (same results); an NHWC backbone there and
        # for the folded backbone on the CPU, and the fine fusion's weights in the layout of
        # the backbone maps it reads (else each of its convolutions reorders its weight per
        # call). After the folding, so the folded convolutions (not in self.model) are placed too.
        self.placement = placement(self._device, self.precision.name, self.reparameterized)
        for module in (self.model, self._backbone, self._fine_fusion):
            apply_weights_dtype(module, self.placement.weights_dtype)
        for module in (self._backbone, self._fine_fusion):
            apply_memory_format(module, self.placement.memory_format)
        self._previous: FrameFeatures | None = None

    # -- parameters -------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def fp16(self) -> bool:
        return self._fp16

    def set_params(self, match_threshold: float | None = None, max_matches: int | None = None,
                   resize: str | None = None, geometric_verification: str | None = None,
                   ransac_reproj_threshold: float | None = None) -> None:
        """Change options (None keeps the current value); effective from the next frame.
        All values are checked before any is applied: a ValueError changes nothing."""
        changes = {name: value for name, value in (
            ("match_threshold", match_threshold), ("max_matches", max_matches), ("resize", resize),
            ("geometric_verification", geometric_verification),
            ("ransac_reproj_threshold", ransac_reproj_threshold)) if value is not None}
        # One attribute swap, so a frame matched in another thread sees old or new, not a mix.
        self.params = replace(self.params, **changes).validated()

    # -- stream -----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the previous frame: the next push starts a new pair."""
        self._previous = None

    @property
    def latest_features(self) -> FrameFeatures | None:
        """The last pushed frame's backbone features (None after a reset): a stereo step
        matches that frame against its right image without running its backbone again."""
        return self._previous

    @torch.inference_mode()
    def push(self, image: np.ndarray) -> dict[str, np.ndarray] | None:
        """Match ``image`` (uint8 HxW or HxWx3 RGB) against the previous frame.

        Returns None for the first frame after a reset, or when the source or model size
        changed (the matcher then restarts from this frame); else the matches (see
        ``match_pair``) with ``keypoints0`` in the previous frame, ``keypoints1`` in this one.
        """
        params = self.params  # one read per frame: a set_params() meanwhile applies to the next
        features = self.extract(self.preprocess(image, params.resize))
        previous, self._previous = self._previous, features
        if previous is None or (previous.source_size, previous.model_size) != \
                (features.source_size, features.model_size):
            return None
        return self.match_features(previous, features, params)

    @torch.inference_mode()
    def match_pair(self, image0: np.ndarray, image1: np.ndarray) -> dict[str, np.ndarray]:
        """Matches between two images, without touching the stream's cache.

        Returns numpy arrays, sorted by descending score: 'keypoints0', 'keypoints1' (N, 2)
        float32 x, y in source pixels, 'scores' (N,) float32, 'inliers' (N,) uint8 (empty
        when geometric_verification is 'none').
        """
        params = self.params
        return self.match_features(self.extract(self.preprocess(image0, params.resize)),
                                   self.extract(self.preprocess(image1, params.resize)), params)

    @torch.inference_mode()
    def match_features(self, features0: FrameFeatures, features1: FrameFeatures,
                       params: EfficientLoFTRParams | None = None) -> dict[str, np.ndarray]:
        """Steps 2-5 and the output format, given both frames' backbone features."""
        params = params or self.params
        if features0.model_size != features1.model_size:
            raise ValueError(f"frames ran at different model sizes {features0.model_size} "
                             f"and {features1.model_size}")
        coarse0, coarse1 = self.transform(features0, features1)
        matches = self.match_coarse(coarse0, coarse1, params.match_threshold)
        matches = self.select(matches, params.max_matches)
        if matches.scores.numel() == 0:
            return empty_result()
        windows0, windows1 = self.fine_windows(coarse0, coarse1, features0, features1, matches)
        points0, points1 = self.refine_windows(windows0, windows1, matches, features0)
        return self.finish(points0, points1, matches.scores, features0, features1, params)

    # -- stages -----------------------------------------------------------------------

    def preprocess(self, image: np.ndarray,
                   resize: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 image -> ((1, 1, h, w) gray in [0, 1] at the model size, source (H, W))."""
        height, width = np.asarray(image).shape[:2]
        size = target_size(resize or self.params.resize, height, width, SIZE_MULTIPLE)
        return preprocess_gray(image, size, self._device), (height, width)

    def extract(self, preprocessed: tuple[torch.Tensor, tuple[int, int]]) -> FrameFeatures:
        """Step 1, per image: the RepVGG backbone, and the transformer's first
        self-attention where the matcher runs it on its own (``FrameFeatures.self_attended``)."""
        pixels, source_size = preprocessed
        with self._autocast():
            maps = self._backbone(pixels.contiguous(memory_format=self.placement.memory_format))  # [1/2, 1/4, 1/8]
        features = FrameFeatures(coarse=maps[-1], residuals=tuple(maps[:-1]),
                                 model_size=tuple(pixels.shape[-2:]), source_size=tuple(source_size))
        if self._transformer is not None:
            features.self_attended = self._attend_self(features.coarse)
        return features

    def transform(self, features0: FrameFeatures, features1: FrameFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 2: the local feature transformer over both coarse maps -> two (1, C, h/8, w/8)."""
        if self._transformer is not None:
            attended = [self._attend_self(features.coarse) if features.self_attended is None
                        else features.self_attended for features in (features0, features1)]
            with self._autocast():
                return self._transformer(*attended, self._position_embeddings(features0.coarse))
        coarse = torch.cat([features0.coarse, features1.coarse])
        channels, height, width = coarse.shape[-3:]
        with self._autocast():
            cos, sin = (embedding.expand(2, -1, -1) for embedding in self._position_embeddings(coarse))
            coarse = self.model.efficientloftr.local_feature_transformer(
                coarse.reshape(1, 2, channels, height, width), position_embeddings=(cos, sin))
        return coarse[:, 0], coarse[:, 1]

    def _attend_self(self, coarse: torch.Tensor) -> torch.Tensor:
        """One frame's coarse map after the transformer's first self-attention."""
        with self._autocast():
            return self._transformer.attend_self(coarse, self._position_embeddings(coarse))

    def _position_embeddings(self, coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary (cos, sin) of one frame's aggregated cells, each (1, h/4 * w/4, C)
        (they depend on the map's size only)."""
        channels = coarse.shape[1]
        cos, sin = self.model.efficientloftr.rotary_emb(coarse)
        return cos.reshape(1, -1, channels), sin.reshape(1, -1, channels)

    def match_coarse(self, coarse0: torch.Tensor, coarse1: torch.Tensor,
                     threshold: float | None = None) -> CoarseMatches:
        """Step 3: mutual nearest neighbours of the dual-softmax confidence, kept as pairs.

        A pair (i, j) is kept when j is i's best cell, i is j's, its confidence exceeds
        ``threshold`` (default: match_threshold) and neither cell is within
        ``coarse_matching_border_removal`` cells of the edge: the reference's mask, read
        via one arg-max each way instead of masks over the whole (h w)^2 matrix, and
        without that matrix unless ``coarse_chunk_bytes`` is 0 (see ``mutual_nearest``).
        """
        threshold = self.params.match_threshold if threshold is None else threshold
        cells = coarse0.shape[-2] * coarse0.shape[-1]
        # Blocks only for a large matrix: up to a size, the whole-matrix softmaxes are
        # faster than the blocked passes (same pairs, see test_eloftr_linear).
        if self.coarse_chunk_bytes != 0 and not whole_matrix_fits(
                cells, coarse1.shape[-2] * coarse1.shape[-1], coarse0.device, self.coarse_chunk_bytes):
            return self._match_coarse_blocks(coarse0, coarse1, threshold)
        confidence = self.coarse_confidence(coarse0, coarse1)[0]  # (L0, L1)
        height, width = coarse0.shape[-2:]
        best0, j_of_i = confidence.max(1)  # per older cell, its best newer cell
        _, i_of_j = confidence.max(0)
        i_ids = torch.arange(confidence.shape[0], device=confidence.device)
        keep = (i_of_j[j_of_i] == i_ids) & (best0 > threshold)
        border = inner_cells(height, width, self.config.coarse_matching_border_removal, confidence.device)
        keep &= border & border[j_of_i]
        i_ids = i_ids[keep]
        return CoarseMatches(i_ids=i_ids, j_ids=j_of_i[i_ids], scores=best0[i_ids])

    def _match_coarse_blocks(self, coarse0: torch.Tensor, coarse1: torch.Tensor,
                             threshold: float) -> CoarseMatches:
        channels, height, width = coarse0.shape[-3:]
        border = inner_cells(height, width, self.config.coarse_matching_border_removal, coarse0.device)
        i_ids, j_ids, scores = mutual_nearest(
            coarse0.float().flatten(2)[0].transpose(0, 1) / channels ** 0.5,
            coarse1.float().flatten(2)[0].transpose(0, 1) / channels ** 0.5,
            self.config.coarse_matching_temperature, self.config.coarse_matching_skip_softmax,
            threshold, border, border, self.coarse_chunk_bytes)
        return CoarseMatches(i_ids=i_ids, j_ids=j_ids, scores=scores)

    def coarse_confidence(self, coarse0: torch.Tensor, coarse1: torch.Tensor) -> torch.Tensor:
        """(1, L0, L1) dual-softmax confidence, exactly as the reference computes it."""
        channels = coarse0.shape[1]
        features0 = coarse0.float().flatten(2).transpose(1, 2) / channels ** 0.5
        features1 = coarse1.float().flatten(2).transpose(1, 2) / channels ** 0.5
        similarity = features0 @ features1.transpose(-1, -2) / self.config.coarse_matching_temperature
        if self.config.coarse_matching_skip_softmax:
            return similarity
        return F.softmax(similarity, 1) * F.softmax(similarity, 2)

    def select(self, matches: CoarseMatches, max_matches: int | None = None) -> CoarseMatches:
        """Sort by descending score and keep the top ``max_matches`` (before refinement:
        the dropped ones need no fine windows)."""
        order = torch.argsort(matches.scores, descending=True, stable=True)
        max_matches = self.params.max_matches if max_matches is None else max_matches
        if max_matches > 0:
            order = order[:max_matches]
        return CoarseMatches(matches.i_ids[order], matches.j_ids[order], matches.scores[order])

    def fine_maps(self, coarse0: torch.Tensor, coarse1: torch.Tensor, features0: FrameFeatures,
                  features1: FrameFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4: attended coarse + backbone residuals -> two (1, Cf, h, w) fine maps."""
        coarse = torch.cat([coarse0, coarse1]) / self.config.hidden_size ** 0.5
        residuals = [torch.cat(pair) for pair in zip(features0.residuals, features1.residuals)]
        with self._autocast():
            fine = self._fine_fusion.forward_pyramid(coarse, residuals[::-1])
        return fine[:1], fine[1:]

    def fine_windows(self, coarse0: torch.Tensor, coarse1: torch.Tensor, features0: FrameFeatures,
                     features1: FrameFeatures, matches: CoarseMatches) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4: each pair's fine windows, (M, k*k, Cf) of cell i in the older frame and
        (M, (k+2)^2, Cf) of cell j in the newer one (zero outside the image), k the
        config's fine_kernel_size: from the whole fine maps or, where ``fine_tile_plan``
        finds it cheaper, from the pyramid run on tiles only (the same up to float rounding)."""
        plan = self.fine_tile_plan(features0, matches)
        if plan is None:
            return self.map_windows(*self.fine_maps(coarse0, coarse1, features0, features1), matches, features0)
        scale = self.config.hidden_size ** 0.5
        with self._autocast():
            windows0, windows1 = tile_windows(
                self._fine_fusion, [coarse0 / scale, coarse1 / scale],
                [list(features0.residuals[::-1]), list(features1.residuals[::-1])],
                [matches.i_ids, matches.j_ids], [0, 1], self.config.fine_kernel_size, plan.tile_cells,
                self.placement.memory_format, plan=plan)
        return windows0, windows1

    def fine_tile_plan(self, features0: FrameFeatures, matches: CoarseMatches) -> TilePlan | None:
        """The tiles the fine pyramid runs on for these matches, or None for the whole maps:
        when tiles are off (``fine_tile_cells`` 0), the fine fusion is not the folded one,
        a subclass supplies its own ``fine_maps``, or the active tiles' convolution work
        times TILE_WORK_RATIO is not below the whole maps' (many or scattered matches)."""
        if self.fine_tile_cells <= 0 or not self.reparameterized or \
                type(self).fine_maps is not EfficientLoFTRStreamMatcher.fine_maps:
            return None
        height, width = features0.coarse.shape[-2:]
        stride, kernel, tile_cells = features0.model_size[0] // height, self.config.fine_kernel_size, self.fine_tile_cells
        full = 2 * full_map_macs(self._fine_fusion, height, width)
        # Clearly the whole maps (each frame needs at least M / T^2 tiles): decided from the
        # match count alone, without reading the cells on the host.
        least, _ = tile_macs_bounds(self._fine_fusion, (height, width), tile_cells, kernel, stride)
        if 2 * -(-matches.i_ids.numel() // tile_cells ** 2) * least * TILE_WORK_RATIO >= full:
            return None
        plan = TilePlan(self._fine_fusion, (height, width), host_ids([matches.i_ids, matches.j_ids]),
                        tile_cells, kernel, stride)
        if plan.macs() * TILE_WORK_RATIO >= full:
            return None
        return plan

    def map_windows(self, fine0: torch.Tensor, fine1: torch.Tensor, matches: CoarseMatches,
                    features0: FrameFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs' windows (as ``fine_windows``) cut from two whole (1, Cf, h, w) fine maps
        (only the matched ones: the reference unfolds every cell of both maps)."""
        coarse_height, coarse_width = features0.coarse.shape[-2:]
        stride = fine0.shape[-2] // coarse_height  # fine pixels per coarse cell
        kernel = self.config.fine_kernel_size
        windows0 = cut_windows(fine0[0], matches.i_ids, coarse_width, stride, kernel, padding=0)
        windows1 = cut_windows(fine1[0], matches.j_ids, coarse_width, stride, kernel + 2, padding=1)
        return windows0, windows1

    def refine(self, fine0: torch.Tensor, fine1: torch.Tensor, matches: CoarseMatches,
               features0: FrameFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 5 on whole fine maps: sub-pixel positions (M, 2), model pixels, of each (i, j) pair."""
        return self.refine_windows(*self.map_windows(fine0, fine1, matches, features0), matches, features0)

    def refine_windows(self, windows0: torch.Tensor, windows1: torch.Tensor, matches: CoarseMatches,
                       features0: FrameFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 5: sub-pixel positions (M, 2), model pixels, of each (i, j) pair from its windows."""
        coarse_height, coarse_width = features0.coarse.shape[-2:]
        model_height = features0.model_size[0]
        coarse_scale = model_height / coarse_height
        points0 = cell_xy(matches.i_ids, coarse_width) * coarse_scale
        points1 = cell_xy(matches.j_ids, coarse_width) * coarse_scale
        return fine_matching(windows0.float(), windows1.float(), points0, points1,
                             fine_scale=1.0,  # the fine maps are at the model's resolution
                             slice_dim=self.config.fine_matching_slice_dim,
                             temperature=self.config.fine_matching_regress_temperature)

    def finish(self, points0: torch.Tensor, points1: torch.Tensor, scores: torch.Tensor,
               features0: FrameFeatures, features1: FrameFeatures,
               params: EfficientLoFTRParams | None = None) -> dict[str, np.ndarray]:
        """Model pixels -> source pixels, to numpy (the core's boundary: float32
        coordinates and scores), then optional geometric verification (numpy, uint8)."""
        params = params or self.params
        # One device-to-host copy (a synchronisation on CUDA) for all three, not one each:
        # flat float32 [keypoints0 (M*2), keypoints1 (M*2), scores (M)], each a view of it.
        count = len(scores)
        flat = torch.cat([scale_to_source(points0, features0.model_size, features0.source_size).float().flatten(),
                          scale_to_source(points1, features1.model_size, features1.source_size).float().flatten(),
                          scores.float()]).cpu().numpy()
        keypoints0, keypoints1 = flat[:2 * count].reshape(count, 2), flat[2 * count:4 * count].reshape(count, 2)
        inliers = np.zeros(0, np.uint8)
        if params.geometric_verification != "none":
            inliers = verify_matches(keypoints0, keypoints1, params.geometric_verification,
                                     params.ransac_reproj_threshold, self.camera)
        return {"keypoints0": keypoints0, "keypoints1": keypoints1, "scores": flat[4 * count:], "inliers": inliers}

    # -- helpers ----------------------------------------------------------------------

    def _autocast(self):
        return self.precision.autocast(self._device)
