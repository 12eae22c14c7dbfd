"""SuperPoint keypoints + descriptors for one image, matching the transformers reference.

Reference pipeline: ``AutoImageProcessor(do_grayscale=True)`` -> ``SuperPointForKeypointDetection``
-> ``processor.post_process_keypoint_detection``. The model reads threshold / NMS radius /
max keypoints from its config once, at load, so this module runs the loaded model's
submodules itself (encoder, score head, descriptor head, same weights) and does the
keypoint selection here, where the settings can change between frames.

Differences from the reference, all deliberate:
  - true grayscale input (the stock processor feeds the R channel; see preprocess.py),
  - keypoints stay float source-pixel coordinates (the reference truncates to int32;
    ``keypoints.int()`` here equals its output),
  - keypoints are sorted by descending score, equal scores in raster order (the
    reference keeps raster order unless max_keypoints is set, then topk's unspecified
    order), so a tie at the max_keypoints-th score keeps the same keypoints on every
    device (``tie_stable_top_k``), and ``max_keypoints <= 0`` means unbounded (reference:
    only < 0),
  - ``border_removal_distance`` applies on all four sides: transformers passes the
    full-resolution score size times 8 again, so its bottom/right border is never
    removed (keypoints at y = h - 1 survive there),
  - NMS uses OpenCV dilations on CPU and separable window maxima elsewhere instead of
    9x9 ``max_pool2d`` (same result; one 640x480 pool on this CPU: 42 ms, 0.23 ms, 1.5 ms),
    and the network runs channels_last (~1.5x faster oneDNN kernels; scores and
    descriptors then differ by float rounding, <= 4e-7 observed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from kp_ros.core import params
from kp_ros.core.model_loading import load_pretrained, resolve_device
from kp_ros.core.precision import resolve_precision, warn_once
from kp_ros.core.preprocess import preprocess_gray, scale_to_source, target_size
from kp_ros.core.threads import small_ops_threads

_SPEC = {p.name: p for p in params.NODES["superpoint_node"]}
CELL = 8  # SuperPoint's score/descriptor cell: the model runs at multiples of 8


@dataclass(frozen=True)
class SuperPointParams:
    """Runtime settings; defaults from kp_ros/core/params.py (the core's own where it differs)."""
    keypoint_threshold: float = _SPEC["keypoint_threshold"].core_value
    nms_radius: int = _SPEC["nms_radius"].core_value
    max_keypoints: int = _SPEC["max_keypoints"].core_value  # <= 0: unbounded
    # 'model' (480x640, as the reference) | 'native' (source size, multiple of 8)
    resize: str = _SPEC["resize"].core_value

    def validated(self) -> "SuperPointParams":
        threshold = self.keypoint_threshold
        low, high = _SPEC["keypoint_threshold"].low, _SPEC["keypoint_threshold"].high  # as the descriptor
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)) \
                or not math.isfinite(threshold) or not low <= threshold <= high:
            raise ValueError(f"keypoint_threshold must be a number in [{low:g}, {high:g}], "
                             f"got {threshold!r}")
        for name in ("nms_radius", "max_keypoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.nms_radius < 0:
            raise ValueError(f"nms_radius must be >= 0, got {self.nms_radius}")
        if self.resize not in params.RESIZE_CHOICES:
            raise ValueError(f"resize must be 'model' or 'native', got {self.resize!r}")
        return SuperPointParams(float(threshold), int(self.nms_radius), int(self.max_keypoints),
                                self.resize)


class SuperPointDetector:
    """``detect(image) -> {'keypoints', 'scores', 'descriptors'}`` (numpy arrays; tensors
    stay inside), composed of the stages ``preprocess`` -> ``forward`` -> ``postprocess``
    (public so a benchmark can time them).

    ``precision`` (fp32 | bf16 | fp16 | auto, see kp_ros/core/precision.py) is the dtype of
    the encoder and the two 3x3 head convolutions (~98 % of the FLOPs); the two 1x1 output
    convolutions, the softmax, the descriptor normalisation, NMS and sampling stay float32
    (scores and descriptors are compared and thresholded there; see test/test_precision.py).
    ``fp16=True`` is the deprecated alias of ``precision='fp16'``. ``one_thread_small_ops``:
    see kp_ros/core/threads.py (off: the process-wide thread counts are never touched).
    """

    def __init__(self, model: str, device: str = "auto",
                 keypoint_threshold: float = SuperPointParams.keypoint_threshold,
                 nms_radius: int = SuperPointParams.nms_radius,
                 max_keypoints: int = SuperPointParams.max_keypoints,
                 resize: str = SuperPointParams.resize, fp16: bool = False,
                 precision: str = "fp32", one_thread_small_ops: bool = False):
        from transformers import SuperPointForKeypointDetection

        self.device = resolve_device(device)
        # Opt-in: pre/post-processing single-threaded on CPU (process-wide counts, restored
        # after each op; see kp_ros/core/threads.py). Off by default: no hidden side effect.
        self.one_thread_small_ops = bool(one_thread_small_ops)
        self.model_id = str(model)
        self.precision = resolve_precision(precision, self.device, fp16)
        warn_once(self.precision)
        self.fp16 = self.precision.dtype == torch.float16
        net = load_pretrained(SuperPointForKeypointDetection, self.model_id)
        net = net.eval().to(self.device, self.precision.dtype)
        # float32 output layers: bf16 logits (8 mantissa bits) move scores by ~1 % and
        # reorder near-equal maxima; these 1x1 convolutions are ~1.5 % of the FLOPs.
        net.keypoint_decoder.conv_score_b.float()
        net.descriptor_decoder.conv_descriptor_b.float()
        self._net = net.to(memory_format=torch.channels_last)
        self._dtype = self.precision.dtype
        self.descriptor_size = int(net.config.descriptor_decoder_dim)
        self.border = int(net.config.border_removal_distance)
        self.params = SuperPointParams()
        self.set_params(keypoint_threshold, nms_radius, max_keypoints, resize)

    def set_params(self, keypoint_threshold=None, nms_radius=None, max_keypoints=None,
                   resize=None) -> None:
        """Change settings (None keeps one); all are validated before any is applied,
        and they take effect on the next ``detect``."""
        changes = {name: value for name, value in (
            ("keypoint_threshold", keypoint_threshold), ("nms_radius", nms_radius),
            ("max_keypoints", max_keypoints), ("resize", resize)) if value is not None}
        # One attribute swap, so a detect() running in another thread sees old or new, not a mix.
        self.params = replace(self.params, **changes).validated()

    @torch.no_grad()  # not inference_mode here: callers may modify the returned arrays in place
    def detect(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 HxW or HxWx3 (RGB) -> numpy: keypoints (N, 2) float32 x, y in source
        pixels, scores (N,) float32 descending, descriptors (N, D) float32 L2-normalized."""
        params = self.params
        pixels = self.preprocess(image, params.resize)
        maps = self.forward(pixels)
        return self.postprocess(maps, tuple(image.shape[:2]), params)

    def preprocess(self, image: np.ndarray, resize: str | None = None) -> torch.Tensor:
        """Image -> (1, 1, h, w) gray in [0, 1] on the device, as the reference processor."""
        height, width = image.shape[:2]
        size = target_size(resize or self.params.resize, height, width, CELL)
        with small_ops_threads(self.device, self.one_thread_small_ops):
            pixels = preprocess_gray(image, size, self.device)
            return pixels.to(self._dtype).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The network: dense score map (1, h, w) before NMS, descriptor map (1, D, h/8, w/8)
        L2-normalized; the same ops as SuperPointForKeypointDetection, minus selection."""
        with self.precision.math_mode(self.device):  # TF32 off for fp32: see precision.py
            return self._forward(pixels)

    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self._net
        encoded = net.encoder(pixels, return_dict=False)[0]
        head = net.keypoint_decoder
        logits = head.conv_score_b(head.relu(head.conv_score_a(encoded)).float())
        probs = F.softmax(logits, 1)[:, :-1]  # the last channel is the "no keypoint" bin
        batch, _, rows, cols = probs.shape
        scores = probs.permute(0, 2, 3, 1).reshape(batch, rows, cols, CELL, CELL)
        scores = scores.permute(0, 1, 3, 2, 4).reshape(batch, rows * CELL, cols * CELL)
        head = net.descriptor_decoder
        descriptors = head.conv_descriptor_b(head.relu(head.conv_descriptor_a(encoded)).float())
        descriptors = F.normalize(descriptors, p=2, dim=1)
        return {"scores": scores, "descriptors": descriptors}

    @torch.no_grad()
    def postprocess(self, maps: dict[str, torch.Tensor], source_size: tuple[int, int],
                    params: SuperPointParams | None = None) -> dict[str, np.ndarray]:
        """NMS, threshold, border, top-k, descriptor sampling, source coordinates, to numpy."""
        with small_ops_threads(self.device, self.one_thread_small_ops):
            return self._select(maps, source_size, params or self.params)

    def _select(self, maps, source_size, params: SuperPointParams) -> dict[str, np.ndarray]:
        # Host-device synchronisations per frame on CUDA: two, both needed by the outputs:
        # the nonzero() below (the number of candidates sizes every later tensor) and the
        # one copy of the packed result to the host. The image upload (preprocess.py) and
        # the constants (cached per size) do not wait for the device.
        scores = maps["scores"][0]
        height, width = scores.shape
        # = nonzero(simple_nms(scores) > threshold) minus the border, as the threshold is >= 0
        mask = nms_mask(scores, params.nms_radius) & (scores > params.keypoint_threshold)
        clear_borders(mask, self.border)
        index = mask.reshape(-1).nonzero().squeeze(1)  # raster order, as the reference's
        kept = scores.reshape(-1).index_select(0, index)
        kept, order = tie_stable_top_k(kept, params.max_keypoints)
        index = index.index_select(0, order)
        xy = torch.stack((index % width, torch.div(index, width, rounding_mode="floor")), 1).float()
        descriptors = sample_descriptors(xy, maps["descriptors"])
        keypoints = scale_to_source(xy, (height, width), source_size)
        return unpack_to_numpy(torch.cat((descriptors.reshape(-1), keypoints.reshape(-1), kept)),
                               len(kept), descriptors.shape[1])


def tie_stable_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the ``k`` highest ``scores`` (all when k <= 0), by descending
    score and, among equal scores, ascending index: the same on every device.

    The reference's ``torch.topk`` leaves the order of ties unspecified, and it differs:
    on CPU it is a quickselect whose pick among equal scores moves with k and N (ten equal
    scores, k = 5: indices 7, 0, 6, 5, 9), and CUDA's differs again. Without a tie at
    the k-th score both select the same set; with one this keeps the lowest (raster) indices.
    """
    values, order = torch.sort(scores, descending=True, stable=True)
    if 0 < k < len(values):
        values, order = values[:k], order[:k]
    return values, order


def clear_borders(mask: torch.Tensor, border: int) -> None:
    """Set ``mask`` (H, W) False within ``border`` pixels of every edge, in place (the
    reference means to do this but only applies the top/left side, see the module docstring)."""
    if border <= 0:
        return
    height, width = mask.shape
    mask[:border] = False
    mask[max(height - border, 0):] = False
    mask[:, :border] = False
    mask[:, max(width - border, 0):] = False


def unpack_to_numpy(packed: torch.Tensor, count: int, size: int) -> dict[str, np.ndarray]:
    """The result as numpy, from descriptors (N*D), keypoints (N*2) and scores (N) packed in
    one float32 tensor: one device-to-host copy instead of three, the descriptors made
    contiguous on the device (by the packing) instead of by the CPU after the copy. Each
    array is a C-contiguous, writable view of that one host buffer (the core's boundary)."""
    flat = packed.cpu().numpy()
    descriptors_end, keypoints_end = count * size, count * (size + 2)
    return {"keypoints": flat[descriptors_end:keypoints_end].reshape(count, 2),
            "scores": flat[keypoints_end:],
            "descriptors": flat[:descriptors_end].reshape(count, size)}


def simple_nms(scores: torch.Tensor, nms_radius: int) -> torch.Tensor:
    """transformers' ``simple_nms``: the scores where ``nms_mask`` holds, 0 elsewhere."""
    return scores.masked_fill(~nms_mask(scores, nms_radius), 0)


def nms_mask(scores: torch.Tensor, nms_radius: int) -> torch.Tensor:
    """Where transformers' ``simple_nms`` keeps a score (local maxima, twice re-admitting
    suppressed neighbourhoods' maxima). On CPU with OpenCV (``cv2.dilate`` is the same
    (2r+1)^2 max pool, out-of-image pixels ignored, ~4x faster); elsewhere in torch."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 2:
        return torch.from_numpy(_nms_mask_opencv(np.ascontiguousarray(scores.numpy()), nms_radius))
    return _nms_mask_torch(scores, nms_radius)


def _nms_mask_opencv(scores: np.ndarray, nms_radius: int) -> np.ndarray:
    """``_nms_mask_torch`` on an HxW float32 array, with OpenCV's dilation as the max pool."""
    kernel = np.ones((2 * nms_radius + 1,) * 2, np.uint8)
    max_mask = scores == cv2.dilate(scores, kernel)
    for _ in range(2):
        supp_mask = cv2.dilate(max_mask.view(np.uint8), kernel).view(bool)
        supp_scores = np.where(supp_mask, np.float32(0), scores)
        new_max_mask = supp_scores == cv2.dilate(supp_scores, kernel)
        max_mask |= new_max_mask & ~supp_mask
    return max_mask


def _nms_mask_torch(scores: torch.Tensor, nms_radius: int) -> torch.Tensor:
    """The mask with every (2r+1)^2 max pool as two separable window maxima."""
    max_mask = scores == _max_pool(scores, nms_radius)
    for _ in range(2):
        supp_mask = _max_pool(max_mask, nms_radius)
        supp_scores = scores.masked_fill(supp_mask, 0)
        new_max_mask = supp_scores == _max_pool(supp_scores, nms_radius)
        max_mask |= new_max_mask & ~supp_mask
    return max_mask


def sample_descriptors(xy: torch.Tensor, descriptors: torch.Tensor, scale: int = CELL) -> torch.Tensor:
    """Bilinear descriptor at model-pixel (x, y), re-normalized: (N, D). The reference's
    ``_sample_descriptors`` arithmetic, step for step, so the values are bit-identical."""
    _, channels, rows, cols = descriptors.shape
    points = xy - scale / 2 + 0.5
    points = points / _device_constant((cols * scale - scale / 2 - 0.5, rows * scale - scale / 2 - 0.5),
                                       points.device, points.dtype)
    points = points * 2 - 1
    sampled = F.grid_sample(descriptors, points.view(1, 1, -1, 2), mode="bilinear", align_corners=True)
    sampled = F.normalize(sampled.reshape(1, channels, -1), p=2, dim=1)
    return sampled[0].t()


@lru_cache(maxsize=64)
def _device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor on ``device``, uploaded once per value (a per-frame
    ``new_tensor`` is a blocking host-to-device copy, i.e. a synchronisation, on CUDA).
    Not a python-scalar divisor: CUDA divides by one as a multiply by its reciprocal,
    which rounds differently from the reference's division by a tensor."""
    return torch.tensor(values, dtype=dtype, device=device)


def _max_pool(x: torch.Tensor, radius: int) -> torch.Tensor:
    """``max_pool2d(kernel 2r+1, stride 1, padding r)`` over the last two dims."""
    return _window_max(_window_max(x, radius, -1), radius, -2)


def _window_max(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Max over [i - r, i + r] along ``dim`` (out of range ignored), by doubling spans:
    about log2(2r+1) elementwise maxima instead of 2r+1."""
    if radius == 0:
        return x
    size, window = x.shape[dim], 2 * radius + 1
    if x.is_floating_point() and dim in (-1, x.dim() - 1):
        # Along contiguous rows torch's own kernel is ~1.7x faster (implicit -inf padding too).
        return F.max_pool1d(x.reshape(1, -1, size), window, 1, radius).reshape(x.shape)
    pad = [0, 0] * (-1 - dim) + [radius, radius]
    if x.dtype == torch.bool:
        padded = F.pad(x.view(torch.uint8), pad).view(torch.bool)
    else:
        padded = F.pad(x, pad, value=float("-inf"))
    span, out = 1, padded  # out[i] = max(padded[i : i + span])
    while 2 * span <= window:
        length = out.shape[dim] - span
        out = torch.maximum(out.narrow(dim, 0, length), out.narrow(dim, span, length))
        span *= 2
    return torch.maximum(out.narrow(dim, 0, size), out.narrow(dim, window - span, size))
