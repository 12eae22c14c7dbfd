"""device_placement: which weights dtype, memory format and upload a (device, precision) gets,
decided without a GPU; the CPU fp32 path untouched bit for bit; and the load-time weight cast
giving autocast's own results (checked with bf16 autocast on the CPU, the same rule as CUDA's)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synthetic_frame

from kp_ros.core import device_placement
from kp_ros.core.device_placement import (Placement, apply_memory_format, apply_weights_dtype, placement,
                                          to_device)
from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher


@pytest.mark.parametrize("device, precision, dtype, channels_last, pinned", [
    ("cpu", "fp32", None, True, False), ("cpu", "bf16", None, True, False),
    ("cuda", "fp32", None, False, True), ("cuda:1", "fp32", None, False, True),
    ("cuda", "fp16", torch.float16, True, True), ("cuda:1", "bf16", torch.bfloat16, True, True),
    (torch.device("cuda", 2), "fp16", torch.float16, True, True), (torch.device("cpu"), "fp32", None, True, False),
])
def test_placement_decision(device, precision, dtype, channels_last, pinned):
    plan = placement(device, precision)
    assert plan.weights_dtype == dtype
    assert plan.memory_format == (torch.channels_last if channels_last else torch.contiguous_format)
    assert plan.pin_memory == plan.non_blocking == pinned


@pytest.mark.parametrize("device, precision, channels_last", [
    ("cpu", "fp32", False), ("cpu", "bf16", False), ("cuda", "fp32", False), ("cuda", "bf16", True)])
def test_unfolded_backbone_keeps_the_default_layout_on_the_cpu(device, precision, channels_last):
    """transformers' own modules on the CPU stay NCHW (the reference's bits in fp32)."""
    plan = placement(device, precision, folded=False)
    assert plan.memory_format == (torch.channels_last if channels_last else torch.contiguous_format)


class FakeHostTensor:
    """Records what the upload does with a host tensor (no CUDA needed)."""

    def __init__(self, calls):
        self.calls = calls

    def pin_memory(self):
        self.calls.append("pin_memory")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", str(device), non_blocking))
        return self


def test_upload_is_pinned_and_asynchronous_only_on_cuda():
    calls = []
    to_device(FakeHostTensor(calls), "cuda:1")
    assert calls == ["pin_memory", ("to", "cuda:1", True)]
    calls.clear()
    to_device(FakeHostTensor(calls), "cpu")
    assert calls == [("to", "cpu", False)]


def test_preprocess_uploads_through_the_decision(monkeypatch):
    from kp_ros.core import preprocess
    seen = []
    real = device_placement.to_device
    monkeypatch.setattr(preprocess, "to_device",
                        lambda tensor, device: seen.append(str(device)) or real(tensor, device))
    preprocess.preprocess_gray(synthetic_frame(32, 48), (32, 48), torch.device("cpu"))
    assert seen == ["cpu"]


def conv_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1)).eval()


def test_weights_cast_only_on_low_precision_layers_and_memory_format_only_when_asked():
    model = conv_model()
    assert apply_weights_dtype(model, None) == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    apply_memory_format(model, torch.contiguous_format)
    assert all(p.is_contiguous() for p in model.parameters())
    assert apply_weights_dtype(model, torch.bfloat16) == 2
    assert model[0].weight.dtype == model[0].bias.dtype == model[3].weight.dtype == torch.bfloat16
    assert model[1].weight.dtype == model[1].running_mean.dtype == torch.float32  # the norm stays float32
    apply_memory_format(model, torch.channels_last)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_matcher_on_cpu_keeps_float32_weights_and_a_channels_last_folded_backbone(tiny_eloftr_dir):
    """fp32 weights in any precision; the folded backbone and the fine fusion (which reads
    the backbone's maps) channels_last, the transformer's weights as loaded."""
    import warnings
    from kp_ros.core.precision import PrecisionWarning
    for precision in ("fp32", "bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)
            matcher = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", precision=precision)
        assert matcher.placement == Placement(None, torch.channels_last, False, False)
        assert all(p.dtype == torch.float32 for p in matcher.model.parameters())
        assert all(p.is_contiguous() for p in matcher.model.efficientloftr.local_feature_transformer.parameters())
        for placed in (matcher._backbone, matcher._fine_fusion):
            convolutions = [m for m in placed.modules() if isinstance(m, torch.nn.Conv2d)]
            assert convolutions and all(c.weight.is_contiguous(memory_format=torch.channels_last)
                                        for c in convolutions)
    unfolded = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", reparameterize=False)
    assert unfolded.placement == Placement(None, torch.contiguous_format, False, False)


def test_cpu_fp32_results_equal_a_matcher_without_placement(tiny_eloftr_dir, monkeypatch):
    """On the CPU in fp32 the placement steps cast nothing and only lay the folded backbone
    and the fine fusion out channels_last: the same matches as a matcher built without them, up to float
    rounding (the unfolded matcher is asked to do nothing: the reference's bits)."""
    from kp_ros.core import eloftr
    frames = [synthetic_frame(96, 128, shift=(8 * i, 0)) for i in range(3)]
    asked = []
    for name in ("apply_weights_dtype", "apply_memory_format"):
        real = getattr(eloftr, name)
        monkeypatch.setattr(eloftr, name, lambda module, value, real=real, name=name:
                            asked.append((name, value)) or real(module, value))
    ours = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", resize="native", match_threshold=0.0)
    # The model and the two folded modules (backbone, fine fusion), then the format of those two.
    assert asked == [("apply_weights_dtype", None)] * 3 + [("apply_memory_format", torch.channels_last)] * 2
    asked.clear()
    EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", reparameterize=False)
    assert asked == [("apply_weights_dtype", None)] * 3 + [("apply_memory_format", torch.contiguous_format)] * 2
    for name in ("apply_weights_dtype", "apply_memory_format"):
        monkeypatch.setattr(eloftr, name, lambda module, value: None)
    plain = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", resize="native", match_threshold=0.0)
    plain.placement = placement("cpu", folded=False)  # its backbone's input as its weights: NCHW
    for frame in frames:
        a, b = ours.push(frame), plain.push(frame)
        assert (a is None) == (b is None)
        if a is not None:
            assert len(a["scores"]) > 0
            for key in a:  # the same matches; positions within 1e-3 px, scores within 1e-4 relative
                assert a[key].shape == b[key].shape, key
                bounds = {"rtol": 1e-4, "atol": 0.0} if key == "scores" else {"rtol": 0.0, "atol": 1e-3}
                assert np.allclose(a[key], b[key], **bounds), key


def test_load_time_cast_gives_autocasts_own_results(tiny_eloftr_dir):
    """Casting conv / linear weights to bf16 once, then running under bf16 autocast, gives
    bit-identical backbone, attention and fine maps to autocast casting them per call
    (the CPU's bf16 autocast follows the same rule as CUDA's for an already-low weight)."""
    import warnings
    from kp_ros.core.precision import PrecisionWarning
    frames = [synthetic_frame(64, 96, shift=(8 * i, 0)) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        per_call = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", resize="native",
                                               precision="bf16")
        at_load = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", resize="native",
                                              precision="bf16")
    assert apply_weights_dtype(at_load.model, torch.bfloat16) > 10
    outputs = []
    with torch.inference_mode():
        for matcher in (per_call, at_load):
            features = [matcher.extract(matcher.preprocess(f)) for f in frames]
            coarse = matcher.transform(*features)
            fine = matcher.fine_maps(*coarse, *features)
            outputs.append([features[0].coarse, *features[0].residuals, *coarse, *fine])
    for a, b in zip(*outputs):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert np.isfinite(outputs[1][0].float().numpy()).all()
