"""EfficientLoFTR matches between consecutive frames of a stream, on the transformers weights.

The pipeline (Wang et al., CVPR 2024), each step a method so it can be timed or swapped:
  1. ``extract``: RepVGG backbone, per image -> coarse (1/8) and residual (1/4, 1/2) maps.
     The only per-image stage, so ``push`` runs it once per frame and keeps the result
     for the next pair.
  2. ``transform``: self- then cross-attention over both coarse maps (rotary positions).
  3. ``match_coarse``: dual-softmax confidence, threshold, border removal, mutual nearest
     neighbours -> one (i, j) cell pair per correspondence.
  4. ``fine_maps``: fuse the attended coarse map with the residuals into full-res features.
  5. ``refine``: for each pair, the 8x8 fine window of cell i in the older frame against
     the 10x10 window of cell j in the newer one: pixel-level argmax, then a 3x3
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
stage is the original EfficientLoFTR's (``fine_matching``). Everything up to the fine
windows is the reference's own arithmetic, bit for bit (see test/test_eloftr.py).

Coordinates follow EfficientLoFTR's convention (the fine window of cell c, pixels
[8c, 8c+8), is read as centred on the cell's coarse point 8c: the trained features are
aligned that way), as floats in source pixels. ``match_threshold`` replaces both the
model's ``coarse_matching_threshold`` and the post-process threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import VERIFICATION_METHODS, verify_matches
from .model_loading import load_pretrained, resolve_device
from .precision import resolve_precision, warn_once
from . import params
from .preprocess import RESIZE_POLICIES, preprocess_gray, scale_to_source, target_size

SIZE_MULTIPLE = 32  # the backbone (1/8) and the 4x4 attention aggregation need H, W % 32 == 0
# match_threshold (coarse dual-softmax confidence), max_matches (<= 0: all), resize,
# geometric_verification, ransac_reproj_threshold (source pixels): see kp_ros/core/params.py.
DEFAULT_CONF = {name: params.spec("eloftr_node", name).core_value for name in (
    "match_threshold", "max_matches", "resize", "geometric_verification", "ransac_reproj_threshold")}


@dataclass
class FrameFeatures:
    """Backbone output of one frame: what can be reused when it becomes the older frame."""
    coarse: torch.Tensor                 # (1, C, h/8, w/8)
    residuals: tuple[torch.Tensor, ...]  # backbone maps at 1/2 and 1/4, in that order
    model_size: tuple[int, int]          # (h, w) the model ran at
    source_size: tuple[int, int]         # (H, W) of the image given


@dataclass
class CoarseMatches:
    """Mutual-NN cell pairs: cell ``i_ids[k]`` of the older frame <-> ``j_ids[k]`` of the newer."""
    i_ids: torch.Tensor   # (M,) int64, flat index into the (h/8, w/8) grid
    j_ids: torch.Tensor   # (M,)
    scores: torch.Tensor  # (M,) dual-softmax confidence


def empty_result() -> dict[str, torch.Tensor]:
    return {"keypoints0": torch.zeros(0, 2), "keypoints1": torch.zeros(0, 2),
            "scores": torch.zeros(0), "inliers": torch.zeros(0, dtype=torch.uint8)}


class EfficientLoFTRStreamMatcher:
    """Matches each pushed frame against the previous one, reusing its backbone features."""

    def __init__(self, model: str, device: str = "auto",
                 match_threshold: float = DEFAULT_CONF["match_threshold"],
                 max_matches: int = DEFAULT_CONF["max_matches"], resize: str = DEFAULT_CONF["resize"],
                 geometric_verification: str = DEFAULT_CONF["geometric_verification"],
                 ransac_reproj_threshold: float = DEFAULT_CONF["ransac_reproj_threshold"],
                 fp16: bool = False, precision: str = "fp32"):
        from transformers import EfficientLoFTRForKeypointMatching

        self._device = resolve_device(device)
        self._conf = dict(DEFAULT_CONF)
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

    @property
    def params(self) -> dict:
        return dict(self._conf)

    def set_params(self, match_threshold: float | None = None, max_matches: int | None = None,
                   resize: str | None = None, geometric_verification: str | None = None,
                   ransac_reproj_threshold: float | None = None) -> None:
        """Change options (None keeps the current value); effective from the next frame.
        All values are checked before any is applied: a ValueError changes nothing."""
        new = dict(self._conf)
        if match_threshold is not None:
            value = _number("match_threshold", match_threshold, float)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"match_threshold must be in [0, 1] (a dual-softmax "
                                 f"confidence), got {match_threshold!r}")
            new["match_threshold"] = value
        if max_matches is not None:
            new["max_matches"] = _number("max_matches", max_matches, int)
        if resize is not None:
            if resize not in RESIZE_POLICIES:
                raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
            new["resize"] = resize
        if geometric_verification is not None:
            if geometric_verification not in VERIFICATION_METHODS:
                raise ValueError(f"geometric_verification must be one of {VERIFICATION_METHODS}, "
                                 f"got {geometric_verification!r}")
            new["geometric_verification"] = geometric_verification
        if ransac_reproj_threshold is not None:
            value = _number("ransac_reproj_threshold", ransac_reproj_threshold, float)
            if not value > 0:
                raise ValueError(f"ransac_reproj_threshold must be > 0 pixels, got {ransac_reproj_threshold!r}")
            new["ransac_reproj_threshold"] = value
        self._conf = new

    # -- stream -----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the previous frame: the next push starts a new pair."""
        self._previous = None

    @torch.inference_mode()
    def push(self, image: np.ndarray) -> dict[str, torch.Tensor] | None:
        """Match ``image`` (uint8 HxW or HxWx3 RGB) against the previous frame.

        Returns None for the first frame after a reset, or when the source or model size
        changed (the matcher then restarts from this frame); else the matches (see
        ``match_pair``) with ``keypoints0`` in the previous frame, ``keypoints1`` in this one.
        """
        features = self.extract(self.preprocess(image))
        previous, self._previous = self._previous, features
        if previous is None or (previous.source_size, previous.model_size) != \
                (features.source_size, features.model_size):
            return None
        return self.match_features(previous, features)

    @torch.inference_mode()
    def match_pair(self, image0: np.ndarray, image1: np.ndarray) -> dict[str, torch.Tensor]:
        """Matches between two images, without touching the stream's cache.

        Returns CPU tensors, sorted by descending score: 'keypoints0', 'keypoints1' (N, 2)
        float32 x, y in source pixels, 'scores' (N,), 'inliers' (N,) uint8 (empty when
        geometric_verification is 'none').
        """
        return self.match_features(self.extract(self.preprocess(image0)),
                                   self.extract(self.preprocess(image1)))

    @torch.inference_mode()
    def match_features(self, features0: FrameFeatures, features1: FrameFeatures) -> dict[str, torch.Tensor]:
        """Steps 2-5 and the output format, given both frames' backbone features."""
        if features0.model_size != features1.model_size:
            raise ValueError(f"frames ran at different model sizes {features0.model_size} "
                             f"and {features1.model_size}")
        coarse0, coarse1 = self.transform(features0, features1)
        matches = self.match_coarse(coarse0, coarse1)
        matches = self.select(matches)
        if matches.scores.numel() == 0:
            return empty_result()
        fine0, fine1 = self.fine_maps(coarse0, coarse1, features0, features1)
        points0, points1 = self.refine(fine0, fine1, matches, features0)
        return self.finish(points0, points1, matches.scores, features0, features1)

    # -- stages -----------------------------------------------------------------------

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 image -> ((1, 1, h, w) gray in [0, 1] at the model size, source (H, W))."""
        height, width = np.asarray(image).shape[:2]
        size = target_size(self._conf["resize"], height, width, SIZE_MULTIPLE)
        return preprocess_gray(image, size, self._device), (height, width)

    def extract(self, preprocessed: tuple[torch.Tensor, tuple[int, int]]) -> FrameFeatures:
        """Step 1, per image: the RepVGG backbone."""
        pixels, source_size = preprocessed
        with self._autocast():
            maps = self.model.efficientloftr.backbone(pixels)  # [1/2, 1/4, 1/8]
        return FrameFeatures(coarse=maps[-1], residuals=tuple(maps[:-1]),
                             model_size=tuple(pixels.shape[-2:]), source_size=tuple(source_size))

    def transform(self, features0: FrameFeatures, features1: FrameFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 2: the local feature transformer over both coarse maps -> two (1, C, h/8, w/8)."""
        coarse = torch.cat([features0.coarse, features1.coarse])
        channels, height, width = coarse.shape[-3:]
        with self._autocast():
            cos, sin = self.model.efficientloftr.rotary_emb(coarse)
            cos = cos.expand(2, -1, -1, -1).reshape(2, -1, channels)
            sin = sin.expand(2, -1, -1, -1).reshape(2, -1, channels)
            coarse = self.model.efficientloftr.local_feature_transformer(
                coarse.reshape(1, 2, channels, height, width), position_embeddings=(cos, sin))
        return coarse[:, 0], coarse[:, 1]

    def match_coarse(self, coarse0: torch.Tensor, coarse1: torch.Tensor,
                     threshold: float | None = None) -> CoarseMatches:
        """Step 3: mutual nearest neighbours of the dual-softmax confidence, kept as pairs.

        A pair (i, j) is kept when j is i's best cell, i is j's, its confidence exceeds
        ``threshold`` (default: match_threshold) and neither cell is within
        ``coarse_matching_border_removal`` cells of the edge: the reference's mask, read
        via one arg-max each way instead of masks over the whole (h w)^2 matrix.
        """
        threshold = self._conf["match_threshold"] if threshold is None else threshold
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

    def coarse_confidence(self, coarse0: torch.Tensor, coarse1: torch.Tensor) -> torch.Tensor:
        """(1, L0, L1) dual-softmax confidence, exactly as the reference computes it."""
        channels = coarse0.shape[1]
        features0 = coarse0.float().flatten(2).transpose(1, 2) / channels ** 0.5
        features1 = coarse1.float().flatten(2).transpose(1, 2) / channels ** 0.5
        similarity = features0 @ features1.transpose(-1, -2) / self.config.coarse_matching_temperature
        if self.config.coarse_matching_skip_softmax:
            return similarity
        return F.softmax(similarity, 1) * F.softmax(similarity, 2)

    def select(self, matches: CoarseMatches) -> CoarseMatches:
        """Sort by descending score and keep the top ``max_matches`` (before refinement:
        the dropped ones need no fine windows)."""
        order = torch.argsort(matches.scores, descending=True, stable=True)
        if self._conf["max_matches"] > 0:
            order = order[:self._conf["max_matches"]]
        return CoarseMatches(matches.i_ids[order], matches.j_ids[order], matches.scores[order])

    def fine_maps(self, coarse0: torch.Tensor, coarse1: torch.Tensor, features0: FrameFeatures,
                  features1: FrameFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4: attended coarse + backbone residuals -> two (1, Cf, h, w) fine maps."""
        coarse = torch.cat([coarse0, coarse1]) / self.config.hidden_size ** 0.5
        residuals = [torch.cat(pair) for pair in zip(features0.residuals, features1.residuals)]
        with self._autocast():
            fine = self.model.refinement_layer.forward_pyramid(coarse, residuals[::-1])
        return fine[:1], fine[1:]

    def refine(self, fine0: torch.Tensor, fine1: torch.Tensor, matches: CoarseMatches,
               features0: FrameFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 5: sub-pixel positions (M, 2), model pixels, of each (i, j) pair.

        Only the matched windows are cut (the reference unfolds every cell of both maps).
        """
        coarse_height, coarse_width = features0.coarse.shape[-2:]
        fine_height = fine0.shape[-2]
        model_height = features0.model_size[0]
        kernel = self.config.fine_kernel_size
        stride = fine_height // coarse_height  # fine pixels per coarse cell
        windows0 = cut_windows(fine0[0], matches.i_ids, coarse_width, stride, kernel, padding=0)
        windows1 = cut_windows(fine1[0], matches.j_ids, coarse_width, stride, kernel + 2, padding=1)
        coarse_scale = model_height / coarse_height
        points0 = cell_xy(matches.i_ids, coarse_width) * coarse_scale
        points1 = cell_xy(matches.j_ids, coarse_width) * coarse_scale
        return fine_matching(windows0.float(), windows1.float(), points0, points1,
                             fine_scale=model_height / fine_height,
                             slice_dim=self.config.fine_matching_slice_dim,
                             temperature=self.config.fine_matching_regress_temperature)

    def finish(self, points0: torch.Tensor, points1: torch.Tensor, scores: torch.Tensor,
               features0: FrameFeatures, features1: FrameFeatures) -> dict[str, torch.Tensor]:
        """Model pixels -> source pixels (CPU, float32), then optional geometric verification."""
        keypoints0 = scale_to_source(points0, features0.model_size, features0.source_size).cpu()
        keypoints1 = scale_to_source(points1, features1.model_size, features1.source_size).cpu()
        inliers = torch.zeros(0, dtype=torch.uint8)
        if self._conf["geometric_verification"] != "none":
            inliers = torch.from_numpy(verify_matches(
                keypoints0.numpy(), keypoints1.numpy(), self._conf["geometric_verification"],
                self._conf["ransac_reproj_threshold"], self.camera))
        return {"keypoints0": keypoints0, "keypoints1": keypoints1,
                "scores": scores.float().cpu(), "inliers": inliers}

    # -- helpers ----------------------------------------------------------------------

    def _autocast(self):
        return self.precision.autocast(self._device)


def _number(name: str, value, kind: type):
    """``value`` as an int or float, or a ValueError naming the option (bools are refused)."""
    try:
        if isinstance(value, (bool, str)) or (kind is int and int(value) != value):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer (<= 0: unbounded)" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


def cell_xy(ids: torch.Tensor, width: int) -> torch.Tensor:
    """Flat coarse-cell indices -> (M, 2) integer (x, y) grid positions."""
    return torch.stack([ids % width, ids // width], dim=-1)


def inner_cells(height: int, width: int, border: int, device) -> torch.Tensor:
    """(h*w,) bool: cells at least ``border`` cells away from the grid's edge."""
    keep = torch.zeros(height, width, dtype=torch.bool, device=device)
    if border <= 0:
        keep[:] = True
    elif height > 2 * border and width > 2 * border:
        keep[border:-border, border:-border] = True
    return keep.flatten()


def cut_windows(fine: torch.Tensor, ids: torch.Tensor, coarse_width: int, stride: int,
                kernel: int, padding: int) -> torch.Tensor:
    """The windows ``F.unfold(fine, kernel, stride, padding)`` would give for cells ``ids``,
    as (M, kernel*kernel, C), without unfolding the whole map."""
    if padding:
        fine = F.pad(fine, (padding, padding, padding, padding))
    xy = cell_xy(ids, coarse_width) * stride
    offsets = torch.arange(kernel, device=fine.device)
    rows = (xy[:, 1, None] + offsets)[:, :, None]  # (M, k, 1)
    cols = (xy[:, 0, None] + offsets)[:, None, :]  # (M, 1, k)
    windows = fine[:, rows, cols]  # (C, M, k, k)
    return windows.permute(1, 2, 3, 0).reshape(len(ids), kernel * kernel, -1)


def fine_matching(windows0: torch.Tensor, windows1: torch.Tensor, points0: torch.Tensor,
                  points1: torch.Tensor, fine_scale: float, slice_dim: int,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EfficientLoFTR's two-stage refinement, as in the original ``FineMatching``.

    windows0 (M, W*W, C): fine features of each older cell; windows1 (M, (W+2)^2, C): of
    each newer cell with a 1-pixel margin; points0/1 (M, 2): the cells' coarse points.
    Stage 1 (first C - slice_dim channels): dual softmax over both windows, the best pixel
    pair moves both points. Stage 2 (last slice_dim channels): a 3x3 soft-argmax around
    the newer pixel moves points1 by up to one pixel.
    (transformers 5.23 takes the dual softmax over (matches, window0) instead of the two
    windows and gathers the stage-1 offsets along the match axis, so every match gets the
    offset of window pixel 0; both fixed here.)
    """
    num, window_area, channels = windows0.shape
    size = int(round(window_area ** 0.5))
    # Stage 1: pixel-level.
    features0 = windows0[..., :-slice_dim] / channels ** 0.5
    features1 = windows1[..., :-slice_dim] / channels ** 0.5
    similarity = features0 @ features1.transpose(1, 2)  # (M, W*W, (W+2)^2)
    confidence = F.softmax(similarity, 1) * F.softmax(similarity, 2)
    confidence = confidence.reshape(num, window_area, size + 2, size + 2)[..., 1:-1, 1:-1]
    best = confidence.reshape(num, -1).argmax(-1)
    index0, index1 = best // window_area, best % window_area
    offsets = window_offsets(size, windows0.device)  # (W*W, 2) x, y around the coarse point
    points0 = points0 + offsets[index0] * fine_scale
    points1 = points1 + offsets[index1] * fine_scale
    # Stage 2: sub-pixel, in the newer frame only. As in the original (and its training),
    # the 3x3 patch is indexed with index1's inner-window row/col directly in the (W+2)-wide
    # grid, i.e. centred one pixel up-left of the stage-1 pixel; -1 wraps around.
    row, col = index1 // size, index1 % size
    step = torch.arange(-1, 2, device=windows0.device)
    rows = (row[:, None, None] + step[None, :, None]) % (size + 2)  # (M, 3, 1)
    cols = (col[:, None, None] + step[None, None, :]) % (size + 2)  # (M, 1, 3)
    patch = windows1.reshape(num, size + 2, size + 2, channels)[
        torch.arange(num, device=windows0.device)[:, None, None], rows, cols][..., -slice_dim:]
    anchor = windows0[torch.arange(num, device=windows0.device), index0][:, -slice_dim:]
    logits = torch.einsum("mabc,mc->mab", patch / slice_dim ** 0.5, anchor).reshape(num, 9)
    heatmap = F.softmax(logits / temperature, -1).reshape(num, 3, 3)
    grid = torch.tensor([-1.0, 0.0, 1.0], device=windows0.device, dtype=heatmap.dtype)
    expected = torch.stack([(heatmap.sum(1) * grid).sum(-1), (heatmap.sum(2) * grid).sum(-1)], -1)
    return points0, points1 + expected * fine_scale


def window_offsets(size: int, device) -> torch.Tensor:
    """(size*size, 2) (x, y) of each window pixel relative to the window's coarse point:
    -size/2 + 0.5 ... size/2 - 0.5 (EfficientLoFTR's convention)."""
    axis = torch.arange(size, device=device, dtype=torch.float32) - size // 2 + 0.5
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1)
