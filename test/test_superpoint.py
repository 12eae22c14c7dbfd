"""kp_ros.core.superpoint against the reference pipeline on the same random-init weights.

Reference = AutoImageProcessor(do_grayscale=True) -> SuperPointForKeypointDetection ->
processor.post_process_keypoint_detection. Where kp_ros differs, on purpose:
  - border: transformers removes border keypoints with the score map's *full-resolution*
    size multiplied by 8 again, so its bottom/right border is never applied (keypoints
    at y = h-1 survive); kp_ros applies ``border_removal_distance`` on all four sides, as
    the config (and the original SuperPoint) intends. Parity compares against the
    reference with its bottom/right band removed, and a test pins the bug down.
  - coordinates: sub-pixel floats, pixel-centre aligned ((x + 0.5) * W / w - 0.5); the
    reference maps x * W / w and truncates. Parity compares model-resolution positions and
    applies each mapping to them,
  - order: descending score (reference: raster order),
  - values: kp_ros runs the network channels_last, so scores and descriptors differ by
    float rounding (observed <= 3e-7); tolerances below are 1e-6 / 1e-5. Keypoint sets
    are compared exactly: such tiny differences could in principle flip a tie or a
    score sitting on the threshold, which these fixed inputs do not hit.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kp_ros.core.model_loading import ModelUnavailableError
from kp_ros.core.preprocess import MODEL_SIZE, scale_to_model, scale_to_source, target_size
from kp_ros.core.superpoint import (SuperPointDetector, SuperPointParams, _nms_mask_torch, nms_mask,
                                    simple_nms)
from conftest import synthetic_frame
from sync_counting import SyncCounter

SCORE_ATOL = 1e-6
DESCRIPTOR_ATOL = 1e-5


@pytest.fixture(scope="module")
def detector(tiny_superpoint_dir) -> SuperPointDetector:
    """Default parameters; tests that change them build their own."""
    return SuperPointDetector(str(tiny_superpoint_dir), device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_superpoint_dir):
    return make_reference(tiny_superpoint_dir)


def make_reference(model_dir, do_grayscale=True, **config):
    from transformers import AutoImageProcessor, SuperPointForKeypointDetection
    processor = AutoImageProcessor.from_pretrained(model_dir, do_grayscale=do_grayscale)
    model = SuperPointForKeypointDetection.from_pretrained(model_dir, **config).eval()
    return processor, model


def reference_detect(reference, image: np.ndarray, size=None) -> dict[str, torch.Tensor]:
    """The guide's pipeline, plus the keypoints at model resolution ('model_xy') to
    compare with (source ints can collide when the model runs larger than the source)."""
    processor, model = reference
    source = Image.fromarray(image) if image.ndim == 2 else image
    kwargs = {"size": {"height": size[0], "width": size[1]}} if size else {}
    with torch.no_grad():
        inputs = processor(source, return_tensors="pt", **kwargs)
        outputs = model(**inputs)
    result = processor.post_process_keypoint_detection(outputs, [image.shape[:2]])[0]
    height, width = inputs["pixel_values"].shape[-2:]
    mask = outputs.mask[0].bool()
    result["model_xy"] = (outputs.keypoints[0][mask] * torch.tensor([width, height])).round().int()
    result["model_size"] = (height, width)
    return result


def without_bottom_right_border(ref: dict, border: int) -> dict:
    height, width = ref["model_size"]
    keep = (ref["model_xy"][:, 0] < width - border) & (ref["model_xy"][:, 1] < height - border)
    return {key: value[keep] if torch.is_tensor(value) else value for key, value in ref.items()}


def by_position(model_xy: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.lexsort((model_xy[:, 0].numpy(), model_xy[:, 1].numpy())))


def assert_matches_reference(ours: dict, ref: dict, border: int, source_size) -> None:
    ref = without_bottom_right_border(ref, border)
    ours = {key: torch.from_numpy(value) for key, value in ours.items()}  # the reference's terms
    ours_model_xy = scale_to_model(ours["keypoints"], ref["model_size"], source_size).round().int()
    assert len(ours["keypoints"]) == len(ref["keypoints"]) > 0
    mine, theirs = by_position(ours_model_xy), by_position(ref["model_xy"])
    assert torch.equal(ours_model_xy[mine], ref["model_xy"][theirs])
    # Like with like: the reference's source ints are its own mapping (x * W / w, truncated)
    # of these same model pixels; ours are the pixel-centre mapping of them.
    (height, width), (source_height, source_width) = ref["model_size"], source_size
    theirs_from_ours = (ours_model_xy.float() / torch.tensor([width, height])
                        * torch.tensor([source_width, source_height])).to(torch.int32)
    assert torch.equal(theirs_from_ours[mine], ref["keypoints"][theirs])
    assert torch.equal(ours["keypoints"], scale_to_source(ours_model_xy, ref["model_size"], source_size))
    torch.testing.assert_close(ours["scores"][mine], ref["scores"][theirs], rtol=0, atol=SCORE_ATOL)
    torch.testing.assert_close(ours["descriptors"][mine], ref["descriptors"][theirs],
                               rtol=0, atol=DESCRIPTOR_ATOL)


# --- parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("frame", [
    pytest.param(lambda: synthetic_frame(480, 640, seed=1), id="synthetic-480x640"),
    pytest.param(lambda: synthetic_frame(120, 160, seed=2), id="synthetic-120x160-upscaled"),
    pytest.param(lambda: synthetic_frame(120, 160, seed=3)[..., 1].copy(), id="mono-120x160"),
])
def test_matches_reference_pipeline(detector, reference, frame):
    image = frame()
    assert_matches_reference(detector.detect(image), reference_detect(reference, image),
                             detector.border, image.shape[:2])


def test_matches_reference_on_real_frames(detector, reference, tum_frames):
    for image in (tum_frames[0], tum_frames[-1]):
        assert_matches_reference(detector.detect(image), reference_detect(reference, image),
                                 detector.border, image.shape[:2])


def test_matches_reference_with_other_parameters(tiny_superpoint_dir):
    """The reference reads these from its config at load; ours takes them at runtime."""
    config = {"keypoint_threshold": 0.02, "nms_radius": 2}
    ours = SuperPointDetector(str(tiny_superpoint_dir), device="cpu")
    ours.set_params(**config)
    image = synthetic_frame(480, 640, seed=5)
    ref = reference_detect(make_reference(tiny_superpoint_dir, **config), image)
    assert_matches_reference(ours.detect(image), ref, ours.border, image.shape[:2])


def test_native_resize_matches_reference_and_stays_in_the_image(tiny_superpoint_dir, reference):
    image = synthetic_frame(100, 150, seed=6)
    ours = SuperPointDetector(str(tiny_superpoint_dir), device="cpu", resize="native")
    size = target_size("native", 100, 150, 8)
    assert size == (104, 152)
    result = ours.detect(image)
    assert_matches_reference(result, reference_detect(reference, image, size=size), ours.border, (100, 150))
    keypoints = result["keypoints"]
    assert (keypoints >= 0).all() and (keypoints[:, 0] < 150).all() and (keypoints[:, 1] < 100).all()


@pytest.mark.parametrize("shape", [(1024, 768), (640, 480), (512, 512), (768, 1024), (376, 1241),
                                   (900, 200), (240, 320)])
def test_matches_reference_on_portrait_square_and_landscape(detector, reference, shape):
    """Issue 13: portrait and square sources, which Pillow resizes vertical pass first."""
    image = synthetic_frame(*shape, seed=shape[0])
    assert_matches_reference(detector.detect(image), reference_detect(reference, image),
                             detector.border, image.shape[:2])


def test_identity_scale_publishes_exact_pixel_positions(detector):
    """At 480x640 (model size) every keypoint is an integer pixel: 254.0, never 253.99998."""
    keypoints = detector.detect(synthetic_frame(480, 640, seed=1))["keypoints"]
    assert len(keypoints) > 0 and np.array_equal(keypoints, keypoints.round())


def test_reference_skips_the_bottom_right_border(detector, reference):
    """Pins the transformers bug kp_ros does not copy: every extra reference keypoint
    lies in the bottom/right border band, and the top/left band is honoured by both."""
    image = synthetic_frame(480, 640, seed=1)
    ref = reference_detect(reference, image)
    ours = detector.detect(image)
    border, (height, width) = detector.border, MODEL_SIZE
    x, y = ref["model_xy"].unbind(1)
    in_band = ((x >= width - border) | (y >= height - border)).numpy()
    assert in_band.any(), "reference fixed? then drop without_bottom_right_border"
    assert len(ref["keypoints"]) - len(ours["keypoints"]) == int(in_band.sum())
    assert (x >= border).all() and (y >= border).all()
    kp = ours["keypoints"]
    assert (kp[:, 0] < width - border).all() and (kp[:, 1] < height - border).all()


def test_stock_reference_sees_only_the_red_channel(tiny_superpoint_dir, detector):
    """The processor as shipped (no do_grayscale) feeds the model the R channel, so its
    keypoints are those of the mono R image; ours, from true gray, differ."""
    image = synthetic_frame(480, 640, seed=7)
    stock = reference_detect(make_reference(tiny_superpoint_dir, do_grayscale=False), image)
    red_only = detector.detect(np.ascontiguousarray(image[..., 0]))
    assert_matches_reference(red_only, stock, detector.border, image.shape[:2])
    ours = detector.detect(image)
    ours_set = set(map(tuple, ours["keypoints"].astype(np.int32).tolist()))
    red_set = set(map(tuple, red_only["keypoints"].astype(np.int32).tolist()))
    assert len(ours_set ^ red_set) > 0.2 * len(ours_set)


# --- runtime parameters ------------------------------------------------------------------

def test_max_keypoints_takes_effect_at_runtime(tiny_superpoint_dir):
    det = SuperPointDetector(str(tiny_superpoint_dir), device="cpu")
    image = synthetic_frame(120, 160, seed=8)
    full = det.detect(image)
    assert len(full["scores"]) > 50
    det.set_params(max_keypoints=50)
    top = det.detect(image)
    assert len(top["scores"]) == 50
    for key in ("keypoints", "scores", "descriptors"):  # the 50 best of the full set
        assert np.array_equal(top[key], full[key][:50])
    det.set_params(max_keypoints=0)  # <= 0: unbounded
    assert len(det.detect(image)["scores"]) == len(full["scores"])
    det.set_params(max_keypoints=10 ** 6)
    assert len(det.detect(image)["scores"]) == len(full["scores"])


def test_threshold_and_nms_take_effect_at_runtime(tiny_superpoint_dir):
    det = SuperPointDetector(str(tiny_superpoint_dir), device="cpu")
    image = synthetic_frame(120, 160, seed=9)
    full = det.detect(image)
    det.set_params(keypoint_threshold=0.05)
    strict = det.detect(image)
    assert 0 < len(strict["scores"]) < len(full["scores"])
    assert (strict["scores"] > 0.05).all()
    assert np.array_equal(strict["scores"], full["scores"][full["scores"] > 0.05])
    det.set_params(keypoint_threshold=0.005, nms_radius=8)
    assert len(det.detect(image)["scores"]) < len(full["scores"])


@pytest.mark.parametrize("bad", [
    {"keypoint_threshold": -0.1}, {"keypoint_threshold": 1.01}, {"keypoint_threshold": float("nan")},
    {"keypoint_threshold": "0.1"}, {"nms_radius": -1}, {"nms_radius": 2.5}, {"nms_radius": True},
    {"max_keypoints": 1.5}, {"resize": "square"}, {"max_keypoints": 10, "resize": "bad"}])
def test_set_params_rejects_bad_values_and_changes_nothing(detector, bad):
    before = detector.params
    with pytest.raises(ValueError):
        detector.set_params(**bad)
    assert detector.params == before == SuperPointParams()


def test_constructor_validates_too(tiny_superpoint_dir):
    with pytest.raises(ValueError, match="nms_radius"):
        SuperPointDetector(str(tiny_superpoint_dir), device="cpu", nms_radius=-2)


# --- edge cases and the output contract ------------------------------------------------

def test_uniform_image(tiny_superpoint_dir):
    """Random weights with zero biases map a black image to logits 0, i.e. every pixel
    scores exactly 1/65 and is its own NMS maximum (the reference does the same; trained
    weights put the mass in the no-keypoint bin instead). A threshold above 1/65 gives
    N = 0, which must come out cleanly with the right shapes."""
    det = SuperPointDetector(str(tiny_superpoint_dir), device="cpu", resize="native")
    black = np.zeros((32, 32), np.uint8)
    flat = det.detect(black)
    assert len(flat["scores"]) == (32 - 2 * det.border) ** 2
    assert np.array_equal(flat["scores"], np.full_like(flat["scores"], np.float32(1.0 / 65)))
    det.set_params(keypoint_threshold=0.02)
    empty = det.detect(np.zeros((32, 32, 3), np.uint8))
    assert empty["keypoints"].shape == (0, 2) and empty["scores"].shape == (0,)
    assert empty["descriptors"].shape == (0, det.descriptor_size)
    assert all(value.dtype == np.float32 for value in empty.values())


def test_output_contract(detector, tiny_superpoint_dir):
    result = detector.detect(synthetic_frame(120, 160, seed=10))
    assert set(result) == {"keypoints", "scores", "descriptors"}
    n = len(result["scores"])
    assert n > 0
    assert result["keypoints"].shape == (n, 2) and result["descriptors"].shape == (n, 256)
    for value in result.values():  # numpy at the core's boundary
        assert isinstance(value, np.ndarray) and value.dtype == np.float32 and value.flags.c_contiguous
    assert (result["scores"][:-1] >= result["scores"][1:]).all()
    np.testing.assert_allclose(np.linalg.norm(result["descriptors"], axis=1), np.ones(n), rtol=1e-5)
    assert (result["keypoints"] != result["keypoints"].round()).any()  # sub-pixel: 480/120 scale
    result["keypoints"] += 1  # writable arrays: callers may edit them
    assert detector.descriptor_size == 256
    assert detector.model_id == str(tiny_superpoint_dir)
    assert detector.device == torch.device("cpu")


def test_mono_equals_rgb_with_equal_channels(detector):
    mono = synthetic_frame(120, 160, seed=11)[..., 2].copy()
    a = detector.detect(mono)
    b = detector.detect(np.repeat(mono[:, :, None], 3, axis=2))
    for key in a:
        assert np.array_equal(a[key], b[key])


def test_detect_composes_the_stages(detector):
    image = synthetic_frame(120, 160, seed=12)
    pixels = detector.preprocess(image)
    assert pixels.shape == (1, 1) + MODEL_SIZE
    maps = detector.forward(pixels)
    assert maps["scores"].shape == (1,) + MODEL_SIZE
    assert maps["descriptors"].shape == (1, 256, MODEL_SIZE[0] // 8, MODEL_SIZE[1] // 8)
    staged = detector.postprocess(maps, image.shape[:2])
    for key, value in detector.detect(image).items():
        assert np.array_equal(staged[key], value)


def test_simple_nms_equals_transformers():
    from transformers.models.superpoint.modeling_superpoint import simple_nms as reference_nms
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(1, 60, 80, generator=generator) ** 4
    scores[:, 10:20, 10:30] = 0.5  # plateaus exercise the ties / re-admission branch
    for radius in range(0, 6):
        expected = reference_nms(scores, radius)
        assert torch.equal(simple_nms(scores, radius), expected)  # (1, H, W): the torch path
        for mask in (nms_mask(scores[0], radius),  # (H, W) float32 on CPU: the OpenCV path
                     _nms_mask_torch(scores[0], radius)):
            assert torch.equal(scores[0].masked_fill(~mask, 0), expected[0])


def test_fp16_is_ignored_on_cpu_with_a_warning(tiny_superpoint_dir):
    with pytest.warns(RuntimeWarning, match="fp16"):
        det = SuperPointDetector(str(tiny_superpoint_dir), device="cpu", fp16=True)
    assert det.fp16 is False
    assert det.preprocess(synthetic_frame(16, 16)).dtype == torch.float32


def test_missing_model_fails_fast(tmp_path):
    with pytest.raises(ModelUnavailableError):
        SuperPointDetector(str(tmp_path / "nothing-here"), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_superpoint_dir, detector):
    image = synthetic_frame(120, 160, seed=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpu = SuperPointDetector(str(tiny_superpoint_dir), device="cuda")
    a, b = detector.detect(image), gpu.detect(image)
    assert isinstance(b["keypoints"], np.ndarray)
    common = min(len(a["scores"]), len(b["scores"]))
    assert abs(len(a["scores"]) - len(b["scores"])) <= 0.01 * common
    np.testing.assert_allclose(a["scores"][:100], b["scores"][:100], rtol=0, atol=1e-4)


def test_one_cpu_thread_sets_one_thread_and_restores_the_count_once():
    from kp_ros.core.threads import one_cpu_thread
    before = torch.get_num_threads()
    with one_cpu_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 1
        with one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def record_thread_changes(monkeypatch) -> list:
    """Every process-wide thread-count change (torch, OpenCV) made from now on."""
    import cv2
    calls = []
    for module, name in ((torch, "set_num_threads"), (cv2, "setNumThreads")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda n, _f=original, _n=name: (calls.append((_n, n)), _f(n))[1])
    return calls


def test_by_default_detect_leaves_the_process_thread_counts_alone(detector, monkeypatch):
    """No hidden side effect for a library user: threads change only when asked for."""
    calls = record_thread_changes(monkeypatch)
    detector.detect(synthetic_frame(32, 32))
    assert calls == []


def test_opted_in_pre_and_post_processing_run_on_one_thread_and_restore_it(tiny_superpoint_dir, monkeypatch):
    """What the nodes ask for (see kp_ros/core/threads.py): single-threaded small ops on
    CPU, the previous counts given back after each."""
    opted_in = SuperPointDetector(str(tiny_superpoint_dir), device="cpu", one_thread_small_ops=True)
    import cv2
    image = synthetic_frame(32, 32)
    before, cv_before = torch.get_num_threads(), cv2.getNumThreads()
    seen = []
    forward = opted_in.forward
    monkeypatch.setattr(opted_in, "forward", lambda pixels: (seen.append(torch.get_num_threads()),
                                                             forward(pixels))[1])
    calls = record_thread_changes(monkeypatch)
    opted_in.detect(image)
    assert ("set_num_threads", 1) in calls and ("setNumThreads", 1) in calls
    assert seen == [before]  # the network keeps all threads
    assert calls[-2:] == [("set_num_threads", before), ("setNumThreads", cv_before)]
    assert torch.get_num_threads() == before and cv2.getNumThreads() == cv_before


# --- tie-stable top-k and the synchronisations per frame ------------------------------------

def reference_selection(scores: torch.Tensor, threshold: float, radius: int, border: int, k: int):
    """transformers' own selection steps (simple_nms, nonzero, border removal, top_k) on a
    (H, W) score map, with the border applied on all four sides as kp_ros does: (y, x) rows."""
    from transformers.models.superpoint.modeling_superpoint import (
        remove_keypoints_from_borders, simple_nms as reference_nms, top_k_keypoints)
    nms = reference_nms(scores[None], radius)[0]
    yx = torch.nonzero(nms > threshold)
    kept = nms[tuple(yx.t())]
    yx, kept = remove_keypoints_from_borders(yx, kept, border, *scores.shape)
    return top_k_keypoints(yx, kept, k)


def tied_score_map(height=64, width=96, seed=0) -> torch.Tensor:
    """Isolated peaks (12 px apart, so NMS keeps each) whose scores come in tied groups."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.zeros(height, width)
    levels = torch.tensor([0.9, 0.7, 0.5, 0.3])
    for y in range(6, height - 6, 12):
        for x in range(6, width - 6, 12):
            scores[y, x] = levels[torch.randint(0, 4, (1,), generator=generator)]
    return scores


def select_with(detector, scores: torch.Tensor, k: int) -> np.ndarray:
    """kp_ros's selection on a hand-made score map: keypoints (x, y) at model resolution."""
    height, width = scores.shape
    descriptors = torch.nn.functional.normalize(torch.randn(1, 256, height // 8, width // 8), dim=1)
    maps = {"scores": scores[None], "descriptors": descriptors}
    params = SuperPointParams(keypoint_threshold=0.1, nms_radius=4, max_keypoints=k)
    return detector.postprocess(maps, (height, width), params)


def test_tie_stable_top_k_orders_by_score_then_index():
    from kp_ros.core.superpoint import tie_stable_top_k
    scores = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1, 0.5, 1])
    values, index = tie_stable_top_k(scores, 5)
    assert index.tolist() == [0, 1, 2, 3, 4] and values.tolist() == [1.0] * 5
    values, index = tie_stable_top_k(scores, 0)  # unbounded: all, ties in index order
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 8]


@pytest.mark.parametrize("k", [3, 8, 14, 20])
def test_top_k_with_ties_inside_the_kept_set_equals_the_reference(detector, k):
    """Tied groups at 0.9 / 0.7 / 0.5 / 0.3; k chosen at a group boundary, so the set is unique."""
    scores = tied_score_map()
    counts = {float(v): int((scores == v).sum()) for v in scores.unique() if v > 0}
    boundaries = np.cumsum([counts[v] for v in sorted(counts, reverse=True)]).tolist()
    k = min(boundaries, key=lambda b: abs(b - k))
    ref_yx, ref_scores = reference_selection(scores, 0.1, 4, detector.border, k)
    ours = select_with(detector, scores, k)
    assert len(ours["scores"]) == len(ref_scores) == k
    theirs = {(int(x), int(y)) for y, x in ref_yx.tolist()}
    assert {(int(x), int(y)) for x, y in ours["keypoints"].round()} == theirs
    np.testing.assert_array_equal(np.sort(ours["scores"]), np.sort(ref_scores.numpy()))


def test_a_tie_at_the_kth_score_keeps_the_first_in_raster_order(detector):
    scores = tied_score_map()
    top = float(scores.max())
    tied = int((scores == top).sum())
    assert tied >= 4
    ours = select_with(detector, scores, tied - 2)  # cuts through the top group
    ys, xs = np.nonzero(scores.numpy() == top)  # raster order
    expected = list(zip(xs[:tied - 2].tolist(), ys[:tied - 2].tolist()))
    assert [(int(x), int(y)) for x, y in ours["keypoints"].round()] == expected
    assert (ours["scores"] == top).all()
    again = select_with(detector, scores, tied - 2)
    assert np.array_equal(again["keypoints"], ours["keypoints"])


def test_postprocess_synchronises_twice_per_frame(detector, monkeypatch):
    """The candidates' count (one nonzero) and the one copy of the packed result; no
    per-frame constants, no mask indexing, no python values read from tensors."""
    image = synthetic_frame(120, 160, seed=21)
    maps = detector.forward(detector.preprocess(image))
    expected = detector.postprocess(maps, image.shape[:2])  # warm: constants cached per size
    counter = SyncCounter(monkeypatch)
    result = detector.postprocess(maps, image.shape[:2])
    monkeypatch.undo()
    assert counter.calls == {"nonzero": 1, "cpu": 1}, counter.calls
    assert len(result["scores"]) > 0
    for key in expected:
        assert np.array_equal(result[key], expected[key])
        assert result[key].flags.c_contiguous and result[key].flags.writeable
