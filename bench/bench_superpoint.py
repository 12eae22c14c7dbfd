"""SuperPoint: kp_ros core vs the reference pipeline, per stage, on the same weights and frames.

    python bench/bench_superpoint.py [--size tiny|full] [--runs N] [--device cpu]
                                     [--image-sizes 480x640,720x1280] [--out [FILE]]

Reference = AutoImageProcessor(do_grayscale=True) -> SuperPointForKeypointDetection (under
torch.no_grad) -> processor.post_process_keypoint_detection. Random-init weights (no hub
access here), so keypoint counts are not those of the trained model; the work per frame
is the same. Stages do not line up one to one: the reference's forward also runs NMS,
selection and descriptor sampling, which kp_ros does in its post-process.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kp_ros.core.random_init import save_random_superpoint  # noqa: E402
from kp_ros.core.superpoint import SuperPointDetector  # noqa: E402

TUM_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tum_fr3_long_office_household"
STAGES = ("preprocess", "forward", "post-process")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "superpoint.md"


def load_frames(count: int = 8) -> tuple[list[np.ndarray], str]:
    paths = sorted(TUM_DIR.glob("*.png"))[:count] if TUM_DIR.is_dir() else []
    if paths:
        from PIL import Image
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths], f"TUM fr3 ({len(paths)} frames)"
    rng = np.random.default_rng(0)
    import cv2
    frames = [cv2.resize(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), (640, 480),
                         interpolation=cv2.INTER_CUBIC) for _ in range(count)]
    return frames, f"synthetic ({count} frames; TUM frames not found at {TUM_DIR})"


class Timer:
    """Wall time per stage, synchronizing CUDA so kernels are counted where they run."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times: dict[str, list[float]] = {stage: [] for stage in STAGES}

    def __call__(self, stage, fn, *args):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*args)
        if self.cuda:
            torch.cuda.synchronize()
        self.times[stage].append(time.perf_counter() - start)
        return result

    def median_ms(self, stage) -> float:
        return 1000 * float(np.median(self.times[stage]))

    def total_ms(self) -> float:
        return 1000 * float(np.median(np.sum([self.times[s] for s in STAGES], axis=0)))


def reference_run(processor, model, image, device, timer):
    def forward(inputs):
        with torch.no_grad():
            return model(**inputs)
    inputs = timer("preprocess", lambda: processor(image, return_tensors="pt").to(device))
    outputs = timer("forward", forward, inputs)
    return timer("post-process", processor.post_process_keypoint_detection, outputs, [image.shape[:2]])[0]


def kp_ros_run(detector, image, timer):
    pixels = timer("preprocess", detector.preprocess, image)
    maps = timer("forward", detector.forward, pixels)
    return timer("post-process", detector.postprocess, maps, image.shape[:2])


def agreement(ours, ref, border, model_size) -> dict[str, float]:
    """IoU of the int keypoint sets (raw, and with the reference's skipped bottom/right
    border removed) and the largest score / descriptor difference on the common ones."""
    ours = {key: torch.from_numpy(value) for key, value in ours.items()}  # the reference's terms
    ours_int = [tuple(p) for p in ours["keypoints"].to(torch.int32).tolist()]
    ref_int = [tuple(p) for p in ref["keypoints"].tolist()]
    a, b = set(ours_int), set(ref_int)
    height, width = model_size
    rel = ref["keypoints"].float()  # source == model size for these frames
    in_border = (rel[:, 0] >= width - border) | (rel[:, 1] >= height - border)
    b_fixed = {p for p, drop in zip(ref_int, in_border.tolist()) if not drop}
    index = {p: i for i, p in enumerate(ref_int)}
    common = [(i, index[p]) for i, p in enumerate(ours_int) if p in index]
    score = desc = 0.0
    if common:
        mine, theirs = (torch.tensor(c) for c in zip(*common))
        score = (ours["scores"][mine] - ref["scores"][theirs]).abs().max().item()
        desc = (ours["descriptors"][mine] - ref["descriptors"][theirs]).abs().max().item()
    return {"n_ours": len(a), "n_ref": len(b), "iou_raw": len(a & b) / max(1, len(a | b)),
            "iou_border_fixed": len(a & b_fixed) / max(1, len(a | b_fixed)),
            "score_diff": score, "descriptor_diff": desc}


def at_size(frames: list[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    """The frames resized (bilinear) to ``size`` (height, width); unchanged when equal."""
    import cv2
    height, width = size
    return [f if f.shape[:2] == size else cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR)
            for f in frames]


def measure(model_dir: Path, frames: list[np.ndarray], source: str, args) -> str:
    """One markdown table: both pipelines on ``frames``, the model run at the frames' size
    (480x640: both pipelines' default; other sizes: the reference processor's ``size`` set
    to it, kp_ros's resize 'native')."""
    from transformers import AutoImageProcessor, SuperPointForKeypointDetection
    height, width = frames[0].shape[:2]
    default = (height, width) == (480, 640)
    detector = SuperPointDetector(str(model_dir), device=args.device,
                                  resize="model" if default else "native")
    extra = {} if default else {"size": {"height": height, "width": width}}
    processor = AutoImageProcessor.from_pretrained(model_dir, do_grayscale=True, **extra)
    model = SuperPointForKeypointDetection.from_pretrained(model_dir).eval().to(detector.device)

    warmup = Timer(detector.device)
    for image in frames[:2]:
        reference_run(processor, model, image, detector.device, warmup)
        kp_ros_run(detector, image, warmup)
    ref_timer, ours_timer = Timer(detector.device), Timer(detector.device)
    checks = []
    for run in range(args.runs):  # interleaved, so load changes hit both alike
        image = frames[run % len(frames)]
        ref = reference_run(processor, model, image, detector.device, ref_timer)
        ours = kp_ros_run(detector, image, ours_timer)
        if run < len(frames):
            checks.append(agreement(ours, ref, detector.border, (height, width)))

    lines = [f"### SuperPoint ({args.size} random-init, {args.device}, {width}x{height} {source}, "
             f"{args.runs} runs, median ms, torch {torch.__version__}, {torch.get_num_threads()} threads)", ""]
    if not default:
        lines += [f"Model run at {width}x{height}: reference processor size={{height: {height}, "
                  f"width: {width}}}, kp_ros resize 'native'.", ""]
    lines += ["| stage | reference | kp_ros | speed-up |", "|---|---:|---:|---:|"]
    for stage in STAGES:
        r, o = ref_timer.median_ms(stage), ours_timer.median_ms(stage)
        lines.append(f"| {stage} | {r:.1f} | {o:.1f} | {r / o:.2f}x |")
    r, o = ref_timer.total_ms(), ours_timer.total_ms()
    lines.append(f"| **total** | **{r:.1f}** | **{o:.1f}** | **{r / o:.2f}x** |")
    lines += ["", f"Throughput: reference {1000 / r:.2f} fps, kp_ros {1000 / o:.2f} fps "
              f"(ratio {r / o:.2f}x).", "",
              "| agreement (per frame, worst) | value |", "|---|---:|",
              f"| keypoints kp_ros / reference | {min(c['n_ours'] for c in checks)}-"
              f"{max(c['n_ours'] for c in checks)} / {min(c['n_ref'] for c in checks)}-"
              f"{max(c['n_ref'] for c in checks)} |",
              f"| keypoint IoU, raw | {min(c['iou_raw'] for c in checks):.4f} |",
              f"| keypoint IoU, reference without its bottom/right border band | "
              f"{min(c['iou_border_fixed'] for c in checks):.4f} |",
              f"| max score diff | {max(c['score_diff'] for c in checks):.2e} |",
              f"| max descriptor diff | {max(c['descriptor_diff'] for c in checks):.2e} |"]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-sizes", default="480x640,720x1280", metavar="HxW,...",
                        help="frame sizes (the TUM frames resized); default %(default)s")
    parser.add_argument("--out", type=Path, nargs="?", const=DEFAULT_OUT,
                        help=f"also write the markdown table (default file: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    frames, source = load_frames()
    sizes = [tuple(int(v) for v in item.split("x")) for item in args.image_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_random_superpoint(Path(tmp) / "superpoint", args.size, seed=0)
        tables = [measure(model_dir, at_size(frames, size), source, args) for size in sizes]
    table = "\n\n".join(tables) + "\n\n" + (
        "The reference's forward includes NMS, selection and descriptor sampling; kp_ros does "
        "those in its post-process. Raw IoU < 1 because transformers never applies the "
        "bottom/right border (it compares with 8x the full-resolution size); kp_ros applies all four.")
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
