"""CPU vs CUDA on the same weights and frames: SuperPoint keypoints and EfficientLoFTR matches
in fp32 (TF32 off, so the GPU computes what the CPU does), and fp16 / bf16 on the GPU within
the agreement bounds test_precision states for bf16 on the CPU. Needs CUDA (skips without);
scripts/gpu_check runs it. Frames: the shared TUM ones when present, else synthetic.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TUM_DIR, synthetic_frame

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)")

from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher, FrameFeatures  # noqa: E402
from kp_ros.core.precision import (DTYPES, PrecisionWarning, keypoint_agreement, match_agreement,  # noqa: E402
                                   resolve_precision)
from kp_ros.core.superpoint import SuperPointDetector  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
REDUCED = ("fp16", "bf16")
# fp32 on both devices, TF32 off: the same arithmetic up to float32 summation order.
FP32_BOUNDS = {"recall": 0.99, "cosine_median": 0.99999, "score_atol": 1e-4,
               "confidence_rel_l1": 1e-3, "nn_same": 0.99, "oracle_iou": 0.99, "oracle_position_max": 0.01}


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Four 640x480 RGB frames of one scene, in camera order."""
    paths = sorted(TUM_DIR.glob("*.png"))[:4] if TUM_DIR.is_dir() else []
    if paths:
        from PIL import Image
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return [synthetic_frame(480, 640, seed=5, shift=(8 * i, 0)) for i in range(4)]


@pytest.fixture(scope="module")
def full_superpoint_dir(tmp_path_factory) -> Path:
    from kp_ros.core.random_init import save_random_superpoint
    return save_random_superpoint(tmp_path_factory.mktemp("superpoint_full"), "full", seed=0)


def quiet(build, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        return build(*args, **kwargs)


@contextlib.contextmanager
def tf32_seen(module: torch.nn.Module):
    """A set of the (cudnn, matmul) TF32 flags each convolution / linear layer of
    ``module`` ran under inside the block (forward pre-hooks)."""
    seen, handles = set(), []

    def hook(_module, _inputs):
        seen.add((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def test_math_mode_turns_tf32_off_for_fp32_on_this_gpu():
    """A float32 matmul and convolution under fp32's math mode match float64 to float32
    accuracy, whatever torch's TF32 defaults are (TF32 would be ~1e-3 off on Ampere+)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=generator), torch.randn(512, 512, generator=generator)
    x, w = torch.randn(1, 32, 64, 64, generator=generator), torch.randn(32, 32, 3, 3, generator=generator)
    exact_mm, exact_conv = a.double() @ b.double(), torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # torch's cuDNN default
        with resolve_precision("fp32", CUDA).math_mode(CUDA):
            mm = (a.to(CUDA) @ b.to(CUDA)).cpu().double()
            conv = torch.nn.functional.conv2d(x.to(CUDA), w.to(CUDA), padding=1).cpu().double()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert ((mm - exact_mm).abs().max() / exact_mm.abs().max()).item() < 1e-5
    assert ((conv - exact_conv).abs().max() / exact_conv.abs().max()).item() < 1e-5


@pytest.mark.parametrize("name", ["fp32", *REDUCED])
def test_every_layer_runs_under_its_precisions_tf32_setting(name, tiny_superpoint_dir, tiny_eloftr_dir, frames):
    expected = {(name != "fp32",) * 2}
    detector = quiet(SuperPointDetector, str(tiny_superpoint_dir), device="cuda", precision=name)
    matcher = quiet(EfficientLoFTRStreamMatcher, str(tiny_eloftr_dir), device="cuda", precision=name,
                    match_threshold=0.0)
    for module, run in ((detector._net, lambda: detector.detect(frames[0])),
                        (matcher.model, lambda: matcher.match_pair(frames[0], frames[1]))):
        with tf32_seen(module) as seen:
            run()
        assert seen == expected, (name, seen)


# --- SuperPoint ------------------------------------------------------------------------------

def test_superpoint_fp32_cuda_matches_cpu(full_superpoint_dir, frames):
    cpu = SuperPointDetector(str(full_superpoint_dir), device="cpu", max_keypoints=1024)
    gpu = SuperPointDetector(str(full_superpoint_dir), device="cuda", max_keypoints=1024)
    assert gpu.precision.name == "fp32" and not gpu.precision.allow_tf32
    for frame in frames[:2]:
        a, b = cpu.detect(frame), gpu.detect(frame)
        assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in b.values())
        agreement = keypoint_agreement(a, b, radius=0.01)  # the same pixels, not near ones
        assert agreement["count"][0] > 100, agreement
        assert agreement["recall"] >= FP32_BOUNDS["recall"], agreement
        assert agreement["precision"] >= FP32_BOUNDS["recall"], agreement
        assert agreement["cosine_median"] >= FP32_BOUNDS["cosine_median"], agreement
        shared = min(len(a["scores"]), len(b["scores"]), 100)
        np.testing.assert_allclose(a["scores"][:shared], b["scores"][:shared], rtol=0,
                                   atol=FP32_BOUNDS["score_atol"])


@pytest.mark.parametrize("name", REDUCED)
def test_superpoint_reduced_precision_on_cuda_within_the_bf16_bounds(name, full_superpoint_dir, frames):
    """test_precision's bf16 bounds: >= 95 % of fp32 keypoints within 1 px (and the
    reverse), descriptor cosine median >= 0.999, 5th percentile >= 0.99."""
    fp32 = SuperPointDetector(str(full_superpoint_dir), device="cuda", max_keypoints=512)
    low = quiet(SuperPointDetector, str(full_superpoint_dir), device="cuda", precision=name, max_keypoints=512)
    assert low.precision.name == name and next(low._net.encoder.parameters()).dtype == low.precision.dtype
    for frame in frames[:2]:
        agreement = keypoint_agreement(fp32.detect(frame), low.detect(frame), radius=1.0)
        assert agreement["count"][0] > 100, agreement
        assert agreement["recall"] >= 0.95 and agreement["precision"] >= 0.95, (name, agreement)
        assert agreement["cosine_median"] >= 0.999 and agreement["cosine_p05"] >= 0.99, (name, agreement)


# --- EfficientLoFTR --------------------------------------------------------------------------

def coarse_confidence(matcher, frame0, frame1) -> torch.Tensor:
    with torch.inference_mode():
        coarse = matcher.transform(matcher.extract(matcher.preprocess(frame0)),
                                   matcher.extract(matcher.preprocess(frame1)))
        return matcher.coarse_confidence(*coarse)[0].float().cpu()


def network_agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float, int]:
    """(same best newer cell on the clear cells, relative L1 error, clear cells): as
    test_precision judges the learned stages (random weights: flat confidences)."""
    best, second = reference.topk(2, 1).values.unbind(1)
    clear = best >= 1.25 * second
    same = (reference.argmax(1) == other.argmax(1))[clear].float().mean().item()
    return same, ((other - reference).abs().sum() / reference.abs().sum()).item(), int(clear.sum())


def crops(frames, count=2, height=224, width=320):
    top, left = (frames[0].shape[0] - height) // 2, (frames[0].shape[1] - width) // 2
    return [np.ascontiguousarray(f[top:top + height, left:left + width]) for f in frames[:count]]


def test_eloftr_fp32_cuda_network_matches_cpu(tiny_eloftr_dir, frames):
    cpu = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", resize="native")
    gpu = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cuda", resize="native")
    frame0, frame1 = crops(frames)
    same, error, clear = network_agreement(coarse_confidence(cpu, frame0, frame1),
                                           coarse_confidence(gpu, frame0, frame1))
    assert clear >= 50, clear
    assert same >= FP32_BOUNDS["nn_same"] and error <= FP32_BOUNDS["confidence_rel_l1"], (same, error)


def test_eloftr_fp32_cuda_stream_matches_cpu(tiny_eloftr_dir, frames):
    """The whole stream step (push), threshold 0: the same matches at the same positions."""
    results = []
    for device in ("cpu", "cuda"):
        matcher = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device=device, match_threshold=0.0)
        assert matcher.push(frames[0]) is None
        results.append(matcher.push(frames[1]))
    a, b = results
    assert all(isinstance(v, np.ndarray) for v in b.values())
    agreement = match_agreement(a, b)
    assert agreement["iou"] >= FP32_BOUNDS["oracle_iou"], agreement
    if agreement["count"][0]:
        assert agreement["position_max"] <= FP32_BOUNDS["oracle_position_max"], agreement


@pytest.mark.parametrize("name", REDUCED)
def test_eloftr_reduced_precision_network_on_cuda_within_the_bf16_bounds(name, tiny_eloftr_dir, frames):
    from test_precision import BOUNDS
    fp32 = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cuda", resize="native")
    low = quiet(EfficientLoFTRStreamMatcher, str(tiny_eloftr_dir), device="cuda", resize="native", precision=name)
    assert low.precision.name == name
    frame0, frame1 = crops(frames)
    same, error, clear = network_agreement(coarse_confidence(fp32, frame0, frame1),
                                           coarse_confidence(low, frame0, frame1))
    assert clear >= 50, clear
    assert same >= BOUNDS["eloftr_nn_same"] and error <= BOUNDS["eloftr_confidence_rel_l1"], (name, same, error)


def oracle_class(dtype: torch.dtype | None):
    """test_eloftr_correctness's hand-made features (computed on the CPU: OpenCV), moved to
    the matcher's device, rounded to ``dtype`` as the autocast stages would hand them on."""
    from test_eloftr_correctness import HandMadeFeatureMatcher

    class OracleOnDevice(HandMadeFeatureMatcher):
        def extract(self, preprocessed):
            pixels, source_size = preprocessed
            features = super().extract((pixels.cpu(), source_size))
            cast = (lambda t: t.to(self.device, dtype)) if dtype is not None else (lambda t: t.to(self.device))
            return FrameFeatures(cast(features.coarse), tuple(cast(r) for r in features.residuals),
                                 features.model_size, features.source_size)
    return OracleOnDevice


@pytest.mark.parametrize("motion", ["sub_cell_shift", "rotation_8deg"])
def test_eloftr_matching_and_refinement_on_cuda_match_cpu_on_oracle_features(motion, tiny_eloftr_dir, frames):
    from test_eloftr_correctness import MOTIONS, THRESHOLD, moved_pair
    affine, _ = MOTIONS[motion]
    image0, image1 = moved_pair(frames[0], affine)
    results = [oracle_class(None)(str(tiny_eloftr_dir), device=device, match_threshold=THRESHOLD,
                                  resize="native").match_pair(image0, image1) for device in ("cpu", "cuda")]
    agreement = match_agreement(*results)
    assert agreement["count"][0] > 300, agreement
    assert agreement["iou"] >= FP32_BOUNDS["oracle_iou"], agreement
    assert agreement["position_max"] <= FP32_BOUNDS["oracle_position_max"], agreement


@pytest.mark.parametrize("name", REDUCED)
def test_eloftr_reduced_precision_features_on_cuda_within_the_oracle_bounds(name, tiny_eloftr_dir, frames):
    from test_eloftr_correctness import MOTIONS, THRESHOLD, errors, moved_pair
    from test_precision import BOUNDS
    affine, bound = MOTIONS["sub_cell_shift"]
    image0, image1 = moved_pair(frames[0], affine)
    reference = oracle_class(None)(str(tiny_eloftr_dir), device="cuda", match_threshold=THRESHOLD,
                                   resize="native").match_pair(image0, image1)
    low_matcher = quiet(oracle_class(DTYPES[name]), str(tiny_eloftr_dir), device="cuda",
                        match_threshold=THRESHOLD, resize="native", precision=name)
    low = low_matcher.match_pair(image0, image1)
    agreement = match_agreement(reference, low)
    assert agreement["count"][0] > 300, agreement
    assert agreement["iou"] >= BOUNDS["oracle_iou"], agreement
    assert agreement["position_median"] <= BOUNDS["oracle_position_median"], agreement
    assert agreement["moved_over_1px"] <= BOUNDS["oracle_moved_over_1px"], agreement
    error32 = np.median(errors(reference["keypoints0"], reference["keypoints1"], affine))
    error_low = np.median(errors(low["keypoints0"], low["keypoints1"], affine))
    assert error_low <= min(error32 + BOUNDS["oracle_error_increase"], bound), (error32, error_low)
