"""precision: fp32 | bf16 | fp16 | auto: resolution, CPU capability detection, and the
agreement of bf16 with fp32 on the same weights and frames (bounds stated in docs/performance.md).

bf16 results do not depend on whether the CPU computes bf16 natively (only the speed
does), so the agreement bounds are checked on any machine; on one without AVX512-BF16 /
AMX bf16 is emulated and slow, hence full-size models on small crops here.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_frame

from kp_ros.core import precision as prec
from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher
from kp_ros.core.precision import (PrecisionWarning, bf16_support_from_flags, keypoint_agreement,
                                   match_agreement, resolve_precision)
from kp_ros.core.superpoint import SuperPointDetector

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(prec, "cpu_bf16_support", lambda: (True, "native bf16 on TestCPU (AMX-BF16)"))


@pytest.fixture
def emulated_bf16(monkeypatch):
    monkeypatch.setattr(prec, "cpu_bf16_support", lambda: (False, "no native bf16 on TestCPU: emulated"))


@pytest.fixture
def gpu(monkeypatch):
    """A fake GPU: ``gpu(major, minor, name)`` makes torch report that compute capability
    for the device asked about (recorded in ``asked``); no CUDA needed."""
    asked = []

    def install(major=8, minor=6, name="Fake RTX A6000"):
        def capability(device=None):
            asked.append(device)
            return (major, minor)
        monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return asked
    install()
    return install


# --- resolution -------------------------------------------------------------------------

def test_auto_is_fp16_on_cuda_and_fp32_on_cpu(gpu):
    assert resolve_precision("auto", CPU).dtype == torch.float32
    assert resolve_precision("auto", CUDA).dtype == torch.float16
    assert resolve_precision("fp32", CUDA).dtype == torch.float32
    assert resolve_precision("fp16", CUDA).name == "fp16"


@pytest.mark.parametrize("capability, expected", [((6, 1), "fp32"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                                  ((8, 0), "fp16"), ((9, 0), "fp16")])
def test_auto_is_fp16_only_from_tensor_core_gpus(gpu, capability, expected):
    gpu(*capability, name="Fake GPU")
    resolved = resolve_precision("auto", CUDA)
    assert resolved.name == expected and resolved.warning == ""
    assert f"sm {capability[0]}.{capability[1]}" in resolved.note
    assert ("no tensor cores" in resolved.note) == (expected == "fp32")


@pytest.mark.parametrize("capability, name, emulated", [
    ((7, 0), "Tesla V100-SXM2-16GB", True), ((7, 5), "Tesla T4", True),
    ((8, 0), "NVIDIA A100-SXM4-40GB", False), ((8, 9), "NVIDIA L4", False),
    ((9, 0), "NVIDIA H200", False)])
def test_bf16_on_a_gpu_without_bf16_tensor_cores_warns_that_it_is_emulated(gpu, capability, name, emulated):
    asked = gpu(*capability, name=name)
    resolved = resolve_precision("bf16", torch.device("cuda:1"))
    assert resolved.dtype == torch.bfloat16  # still runs: the user asked for bf16
    assert asked == [torch.device("cuda:1")]  # the GPU asked for, not the current one
    assert bool(resolved.warning) == emulated
    if emulated:
        assert "emulated" in resolved.warning and name in resolved.warning


def test_fp16_on_a_gpu_without_tensor_cores_warns(gpu):
    gpu(6, 1, name="GeForce GTX 1080")
    assert "no tensor cores" in resolve_precision("fp16", CUDA).warning
    gpu(7, 5)
    assert resolve_precision("fp16", CUDA).warning == ""


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # a CPU-only torch: autocast off
@pytest.mark.parametrize("name, tf32", [("fp32", False), ("bf16", True), ("fp16", True)])
def test_tf32_is_set_per_precision_around_each_call_and_restored(gpu, name, tf32):
    """torch's default is cudnn.allow_tf32 = True: fp32 convolutions in TF32 on Ampere+."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32)
    resolved = resolve_precision(name, CUDA)
    assert resolved.allow_tf32 == tf32
    try:
        for before in (True, False):
            cudnn.allow_tf32 = matmul.allow_tf32 = before
            with resolved.math_mode(CUDA):
                assert (cudnn.allow_tf32, matmul.allow_tf32) == (tf32, tf32)
            with resolved.autocast(CUDA):
                assert (cudnn.allow_tf32, matmul.allow_tf32) == (tf32, tf32)
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (before, before)
            with resolved.math_mode(CPU):  # CPU: untouched
                assert (cudnn.allow_tf32, matmul.allow_tf32) == (before, before)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_superpoint_forward_runs_in_its_math_mode(tiny_superpoint_dir, monkeypatch):
    detector = SuperPointDetector(str(tiny_superpoint_dir), device="cpu")
    entered = []
    real = type(detector.precision).math_mode
    monkeypatch.setattr(type(detector.precision), "math_mode",
                        lambda self, device: entered.append(device) or real(self, device))
    detector.forward(detector.preprocess(synthetic_frame(32, 48)))
    assert entered == [detector.device]


def test_fp16_on_cpu_falls_back_to_fp32_with_a_warning():
    resolved = resolve_precision("fp16", CPU)
    assert resolved.name == "fp32" and resolved.dtype == torch.float32
    assert "fp16" in resolved.warning and "CUDA" in resolved.warning


def test_bf16_on_a_native_cpu_runs_quietly_and_says_so(native_bf16):
    resolved = resolve_precision("bf16", CPU)
    assert resolved.dtype == torch.bfloat16 and resolved.warning == ""
    assert "native bf16" in resolved.note and "AMX-BF16" in resolved.note


def test_bf16_on_a_cpu_without_it_warns_that_it_is_slower(emulated_bf16):
    resolved = resolve_precision("bf16", CPU)
    assert resolved.dtype == torch.bfloat16  # still runs: the user asked for bf16
    assert "SLOWER" in resolved.warning and "AVX512-BF16" in resolved.warning
    assert "emulated" in resolved.note


def test_deprecated_fp16_flag_is_an_alias_and_contradictions_are_errors(gpu):
    assert resolve_precision("fp32", CUDA, fp16=True).name == "fp16"
    assert "deprecated" in resolve_precision("auto", CUDA, fp16=True).note
    assert resolve_precision("fp32", CPU, fp16=True).name == "fp32"  # CUDA-only, as before
    with pytest.raises(ValueError, match="contradicts"):
        resolve_precision("bf16", CPU, fp16=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", CPU)


def test_bf16_support_from_cpu_flags():
    assert bf16_support_from_flags({"avx512_bf16": True}, "X")[0]
    assert bf16_support_from_flags({"amx_bf16": True, "avx512_bf16": False}, "X") == \
        (True, "native bf16 on X (AMX-BF16)")
    native, what = bf16_support_from_flags({"avx2": True, "avx512_f": True}, "AMD EPYC")
    assert not native and "AMD EPYC" in what and "emulated" in what


def test_detection_agrees_with_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set(re.findall(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.M)[0].split())
    native, _ = prec.cpu_bf16_support()
    assert native == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_cores_use_the_precision_and_warn_once(tiny_superpoint_dir, tiny_eloftr_dir, emulated_bf16):
    with pytest.warns(PrecisionWarning, match="SLOWER"):
        detector = SuperPointDetector(str(tiny_superpoint_dir), device="cpu", precision="bf16")
    assert next(detector._net.encoder.parameters()).dtype == torch.bfloat16
    assert detector._net.keypoint_decoder.conv_score_b.weight.dtype == torch.float32
    features = detector.detect(synthetic_frame(64, 96))
    assert all(v.dtype == np.float32 for v in features.values())
    with pytest.warns(PrecisionWarning, match="SLOWER"):
        matcher = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", precision="bf16")
    assert matcher.precision.name == "bf16" and not matcher.fp16
    pixels = matcher.preprocess(synthetic_frame(64, 96))
    assert matcher.extract(pixels).coarse.dtype == torch.bfloat16  # autocast is on
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32: no warning
        assert SuperPointDetector(str(tiny_superpoint_dir), device="cpu").precision.name == "fp32"


def test_fp32_is_the_default_and_unchanged(tiny_superpoint_dir):
    frame = synthetic_frame(96, 128)
    default = SuperPointDetector(str(tiny_superpoint_dir), device="cpu").detect(frame)
    explicit = SuperPointDetector(str(tiny_superpoint_dir), device="cpu", precision="fp32").detect(frame)
    for key in default:
        assert np.array_equal(default[key], explicit[key]), key


# --- agreement with fp32: full-size random-init weights ------------------------------------

@pytest.fixture(scope="module")
def full_superpoint_dir(tmp_path_factory) -> Path:
    from kp_ros.core.random_init import save_random_superpoint
    return save_random_superpoint(tmp_path_factory.mktemp("superpoint_full"), "full", seed=0)


@pytest.fixture(scope="module")
def full_eloftr_dir(tmp_path_factory) -> Path:
    from kp_ros.core.random_init import save_random_eloftr
    return save_random_eloftr(tmp_path_factory.mktemp("eloftr_full"), "full", seed=0)


def crops(frames, height, width, count):
    top, left = (frames[0].shape[0] - height) // 2, (frames[0].shape[1] - width) // 2
    return [np.ascontiguousarray(f[top:top + height, left:left + width]) for f in frames[:count]]


def test_superpoint_bf16_reproduces_fp32_keypoints_and_descriptors(full_superpoint_dir, tum_frames):
    """Bounds: >= 95 % of fp32 keypoints within 1 px of a bf16 one (and the reverse),
    descriptor cosine median >= 0.999 and 5th percentile >= 0.99.
    Measured (3 TUM 640x480 frames, top 1024): 97.2-98.1 % within 1 px; with the 1x1
    output convolutions also in bf16 96.6-97.0 %."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        bf16 = SuperPointDetector(str(full_superpoint_dir), device="cpu", precision="bf16",
                                  resize="native", max_keypoints=512)
    fp32 = SuperPointDetector(str(full_superpoint_dir), device="cpu", resize="native", max_keypoints=512)
    for frame in crops(tum_frames, 240, 320, 2):
        agreement = keypoint_agreement(fp32.detect(frame), bf16.detect(frame), radius=1.0)
        assert agreement["count"][0] > 300, agreement
        assert agreement["recall"] >= 0.95 and agreement["precision"] >= 0.95, agreement
        assert agreement["cosine_median"] >= 0.999 and agreement["cosine_p05"] >= 0.99, agreement


def test_eloftr_bf16_network_agrees_with_fp32(tiny_eloftr_dir, tum_frames):
    """The learned stages under bf16 autocast (backbone, attention): the coarse confidence
    matrix and each older cell's best newer cell, against fp32 on the same weights.
    Random weights give ~1 mutual-NN match per pair here, so the nearest-neighbour field
    (every cell) is compared instead; the mutual-NN sets are compared on oracle features
    below."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        bf16 = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", resize="native",
                                           precision="bf16")
    fp32 = EfficientLoFTRStreamMatcher(str(tiny_eloftr_dir), device="cpu", resize="native")
    frame0, frame1 = crops(tum_frames, 224, 320, 2)
    with torch.inference_mode():
        confidences = []
        for matcher in (fp32, bf16):
            coarse = matcher.transform(matcher.extract(matcher.preprocess(frame0)),
                                       matcher.extract(matcher.preprocess(frame1)))
            confidences.append(matcher.coarse_confidence(*coarse)[0])
    reference, low = confidences
    assert low.dtype == torch.float32  # the dual softmax runs in float32
    # Random weights give nearly flat confidences (max ~0.06): judge the cells whose fp32
    # best cell wins by >= 25 % over the runner-up, where a decision is being made at all.
    best, second = reference.topk(2, 1).values.unbind(1)
    clear = best >= 1.25 * second
    assert clear.sum() >= 50, int(clear.sum())
    same_best = (reference.argmax(1) == low.argmax(1))[clear].float().mean().item()
    error = ((low - reference).abs().sum() / reference.abs().sum()).item()
    assert same_best >= BOUNDS["eloftr_nn_same"], same_best
    assert error <= BOUNDS["eloftr_confidence_rel_l1"], error


# --- EfficientLoFTR on oracle features: the float32 stages fed bf16 features ------------------

BOUNDS = {
    # Tiny random-init model, 224x320 TUM crops: same best cell for 97 % of the clear cells
    # (80 % of all cells), confidence relative L1 error 0.36, of which the backbone's bf16
    # alone gives 0.33 and the attention's alone 0.025.
    "eloftr_nn_same": 0.9,
    "eloftr_confidence_rel_l1": 0.5,
    "oracle_iou": 0.93,               # measured 0.960-0.997 (TUM / synthetic, 4 motions)
    "oracle_position_median": 0.01,   # px; measured <= 0.001
    "oracle_moved_over_1px": 0.05,    # share of shared matches; measured <= 0.02
    "oracle_error_increase": 0.05,    # px, median error vs the true motion; measured <= 0.01
}


@pytest.fixture(scope="module")
def oracle_matchers(tiny_eloftr_dir):
    from test_eloftr_correctness import THRESHOLD, HandMadeFeatureMatcher

    class LowPrecisionFeatures(HandMadeFeatureMatcher):
        """The hand-made features rounded to the autocast dtype, as the backbone, attention
        and fine fusion hand them to the float32 matching and refinement."""
        def extract(self, preprocessed):
            from kp_ros.core.eloftr import FrameFeatures
            features, dtype = super().extract(preprocessed), self.precision.dtype
            return FrameFeatures(features.coarse.to(dtype), tuple(r.to(dtype) for r in features.residuals),
                                 features.model_size, features.source_size)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        low = LowPrecisionFeatures(str(tiny_eloftr_dir), device="cpu", match_threshold=THRESHOLD,
                                   resize="native", precision="bf16")
    return HandMadeFeatureMatcher(str(tiny_eloftr_dir), device="cpu", match_threshold=THRESHOLD,
                                  resize="native"), low


@pytest.mark.parametrize("motion", ["sub_cell_shift", "rotation_8deg"])
@pytest.mark.parametrize("source", ["tum", "synthetic"])
def test_eloftr_bf16_mutual_nn_set_and_positions_on_oracle_features(oracle_matchers, motion, source, request):
    from test_eloftr_correctness import MOTIONS, errors, moved_pair
    fp32, bf16 = oracle_matchers
    frame = request.getfixturevalue("tum_frames")[0] if source == "tum" else synthetic_frame(480, 640, seed=3)
    affine, bound = MOTIONS[motion]
    image0, image1 = moved_pair(frame, affine)
    reference, low = fp32.match_pair(image0, image1), bf16.match_pair(image0, image1)
    agreement = match_agreement(reference, low)
    assert agreement["count"][0] > 300, agreement
    assert agreement["iou"] >= BOUNDS["oracle_iou"], agreement
    assert agreement["position_median"] <= BOUNDS["oracle_position_median"], agreement
    assert agreement["moved_over_1px"] <= BOUNDS["oracle_moved_over_1px"], agreement
    error32 = np.median(errors(reference["keypoints0"], reference["keypoints1"], affine))
    error16 = np.median(errors(low["keypoints0"], low["keypoints1"], affine))
    assert error16 <= min(error32 + BOUNDS["oracle_error_increase"], bound), (error32, error16)


# --- nodes and process_bag --------------------------------------------------------------------

@pytest.mark.parametrize("node", ["superpoint_node", "eloftr_node"])
def test_nodes_run_bf16_and_say_so_in_the_start_up_line(node, tiny_superpoint_dir, tiny_eloftr_dir,
                                                        emulated_bf16, capfd):
    import rclpy
    from kp_ros.msg import Keypoints, Matches
    from kp_ros.nodes import eloftr_node, superpoint_node
    from ros_helpers import InProcessNode
    if node == "superpoint_node":
        spec = (superpoint_node.SuperPointNode, Keypoints, "keypoints", tiny_superpoint_dir)
    else:
        spec = (eloftr_node.EfficientLoFTRNode, Matches, "matches", tiny_eloftr_dir)
    node_class, output_type, topic, model = spec
    harness = InProcessNode(node_class, "/precision", output_type, topic, {
        "model": str(model), "device": "cpu", "resize": "native", "precision": "bf16"})
    try:
        assert harness.node.core.precision.name == "bf16"
        assert "precision bf16 (no native bf16 on TestCPU: emulated)" in harness.node.describe()
        frames = [synthetic_frame(96, 128, shift=(2 * i, i)) for i in range(2)]
        sent = [harness.submit(frame, 1.0 + 0.1 * i) for i, frame in enumerate(frames)]
        assert harness.output_for(sent[-1]) is not None
    finally:
        if rclpy.ok(context=harness.context):
            harness.close()
    output = "".join(capfd.readouterr())
    assert "SLOWER than fp32" in output  # the warning is a ROS log line


def test_node_refuses_a_precision_contradiction_with_one_fatal_line(tiny_superpoint_dir, capfd):
    from kp_ros.nodes import superpoint_node
    code = superpoint_node.main(["--ros-args", "-p", f"model:={tiny_superpoint_dir}", "-p", "device:=cpu",
                                 "-p", "precision:=bf16", "-p", "fp16:=true"])
    output = "".join(capfd.readouterr())
    assert code == 1 and "contradicts precision: bf16" in output and "Traceback" not in output


def test_process_bag_precision_flag(tmp_path, tiny_superpoint_dir, tiny_eloftr_dir, emulated_bf16):
    from test_process_bag import image_bag, read_outputs
    from kp_ros.offline import process_bag_cli as pb
    image_bag(tmp_path / "in", [synthetic_frame(96, 128, shift=(2 * i, i)) for i in range(3)])
    args = ["--superpoint-model", str(tiny_superpoint_dir), "--eloftr-model", str(tiny_eloftr_dir),
            "--device", "cpu", "--resize", "native", "--match-threshold", "0", "--threads", "1",
            "--no-progress", str(tmp_path / "in")]
    parsed = pb.build_parser().parse_args(["--precision", "bf16"] + args + [str(tmp_path / "out")])
    detector, matcher, _ = pb.resolve_options(parsed)
    assert detector["precision"] == matcher["precision"] == "bf16"
    with pytest.warns(PrecisionWarning, match="SLOWER"):
        assert pb.main(["--precision", "bf16"] + args + [str(tmp_path / "bf16")]) == 0
    outputs = read_outputs(tmp_path / "bf16")
    assert len(outputs["/cam/keypoints"]) == 3 and len(outputs["/cam/matches"]) == 2
    # The deprecated flag still parses (fp16 on CPU runs fp32, with a warning).
    with pytest.warns(PrecisionWarning, match="fp16"):
        assert pb.main(["--fp16"] + args + [str(tmp_path / "fp16")]) == 0
