"""Precision: each path's speed against the seed pipeline and against this machine's limit.

    python bench/bench_precision.py [--size full|tiny] [--runs N] [--device cpu]
        [--precisions fp32,bf16] [--resolutions 480x640,720x1280,1080x1920]
        [--scaling-models superpoint,eloftr] [--max-call-seconds S] [--out DIR]

For SuperPoint (one frame) and EfficientLoFTR (one stream step: backbone on the new frame,
attention and matching on the pair) in each precision, and for the seed pipelines
(transformers' processor -> model -> post-process, float32; EfficientLoFTR per pair):
  - median wall time per call at 640x480 (or --frame-size) and the ratio to the seed pipeline,
  - GFLOP per call (torch.utils.flop_counter; the same ops in every precision), achieved
    GFLOP/s, and the machine's measured ceiling for that dtype (the faster of a 1024^3
    matmul and a 3x3 64->64 convolution at 640x480), so "% of ceiling" says how much is left,
  - bf16 vs fp32 agreement (SuperPoint: keypoints within 1 px, descriptor cosine;
    EfficientLoFTR: mutual-NN set IoU and position changes at threshold 0),
  - time vs resolution (480p, 720p, 1080p) for both models (or --scaling-models) and
    precisions, as a plot,
  - on CUDA, the peak GPU memory of each path and size (torch.cuda.max_memory_allocated
    during its timed calls, the model's weights included).
A path whose call takes longer than --max-call-seconds (bf16 emulated on a CPU without
AVX512-BF16 / AMX: ~40x slower than fp32) is timed once and skipped at larger sizes.
Random-init weights of the real sizes (no hub here): timings and FLOPs are the real
ones, keypoint and match counts are not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher  # noqa: E402
from kp_ros.core.model_loading import resolve_device  # noqa: E402
from kp_ros.core.precision import (DTYPES, PrecisionWarning, cpu_bf16_support,  # noqa: E402
                                   keypoint_agreement, match_agreement)
from kp_ros.core.random_init import save_random_eloftr, save_random_superpoint  # noqa: E402
from kp_ros.core.superpoint import SuperPointDetector  # noqa: E402

TUM_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tum_fr3_long_office_household"


def load_frames(count: int = 4) -> tuple[list[np.ndarray], str]:
    paths = sorted(TUM_DIR.glob("*.png"))[:count] if TUM_DIR.is_dir() else []
    if paths:
        from PIL import Image
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths], "TUM fr3"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
    from conftest import synthetic_frame
    return [synthetic_frame(480, 640, seed=0, shift=(4 * i, 2 * i)) for i in range(count)], "synthetic"


def resized(frames, size):
    import cv2
    height, width = size
    return [f if f.shape[:2] == size else cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR)
            for f in frames]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_calls(call, args_list, runs: int, device, max_seconds: float) -> tuple[list[float], bool]:
    """Seconds per call after one warm-up; a warm-up slower than ``max_seconds`` is the only
    measurement (returned with slow=True)."""
    sync(device)
    start = time.perf_counter()
    call(*args_list[0])
    sync(device)
    first = time.perf_counter() - start
    if first > max_seconds:
        return [first], True
    times = []
    for k in range(runs):
        args = args_list[(k + 1) % len(args_list)]
        sync(device)
        start = time.perf_counter()
        call(*args)
        sync(device)
        times.append(time.perf_counter() - start)
    return times, False


class PeakMemory:
    """torch.cuda.max_memory_allocated over the ``with`` block, in MiB (``mib``; None on CPU:
    the process RSS there mixes every model and frame of the run)."""

    def __init__(self, device):
        self.device, self.mib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return False


def peak_text(mib) -> str:
    return "" if mib is None else f", peak {mib:.0f} MiB"


def count_gflop(call, *args) -> float:
    with FlopCounterMode(display=False) as counter:
        call(*args)
    return counter.get_total_flops() / 1e9


# --- the machine's ceilings ------------------------------------------------------------------

def ceilings(device, precisions, budget_s: float = 2.0) -> dict:
    """Best GFLOP/s of a 1024^3 matmul and of a 3x3 64->64 convolution at 480x640, per dtype,
    measured in a fresh process that keeps per-frame blocks in the heap as kp_ros does
    (kp_ros/core/cpu_heap.py; with glibc's default each 75 MiB convolution output is new
    pages, which would lower the ceiling) without changing this process's malloc."""
    code = (f"import json, sys, torch; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "from kp_ros.core.cpu_heap import retain_freed_memory; retain_freed_memory(); "
            "import bench_precision as b; "
            f"print(json.dumps(b.measure_ceilings(torch.device({str(device)!r}), {list(precisions)!r}, {budget_s!r})))")
    env = {**os.environ, "KP_ROS_RETAIN_HEAP": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"ceiling measurement failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_ceilings(device, precisions, budget_s: float = 2.0) -> dict:
    """``ceilings`` in this process."""
    out = {}
    for name in precisions:
        dtype = DTYPES[name]
        if device.type == "cpu" and name == "fp16":
            continue
        a = torch.randn(1024, 1024, device=device, dtype=dtype)
        b = torch.randn(1024, 1024, device=device, dtype=dtype)
        x = torch.randn(1, 64, 480, 640, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).to(device, dtype).to(memory_format=torch.channels_last)
        result = {}
        with torch.inference_mode():
            for label, fn, flop in (("matmul", lambda: a @ b, 2 * 1024 ** 3),
                                    ("conv3x3", lambda: conv(x), 2 * 9 * 64 * 64 * 480 * 640)):
                best, spent = float("inf"), 0.0
                for _ in range(20):
                    sync(device)
                    start = time.perf_counter()
                    fn()
                    sync(device)
                    elapsed = time.perf_counter() - start
                    best, spent = min(best, elapsed), spent + elapsed
                    if spent > budget_s:
                        break
                result[label] = flop / best / 1e9
        out[name] = result
    return out


# --- the paths -------------------------------------------------------------------------------

class SeedSuperPoint:
    def __init__(self, model_dir, device):
        from transformers import AutoImageProcessor, SuperPointForKeypointDetection
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir), do_grayscale=True)
        self.model = SuperPointForKeypointDetection.from_pretrained(str(model_dir)).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, image):
        inputs = self.processor(image, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        return self.processor.post_process_keypoint_detection(outputs, [image.shape[:2]])[0]


class SeedEfficientLoFTR:
    def __init__(self, model_dir, device):
        from transformers import AutoImageProcessor, EfficientLoFTRForKeypointMatching
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir))
        self.model = EfficientLoFTRForKeypointMatching.from_pretrained(str(model_dir)).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, image0, image1):
        inputs = self.processor([image0, image1], return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        return self.processor.post_process_keypoint_matching(
            outputs, [[image0.shape[:2], image1.shape[:2]]], threshold=0.2)[0]


def build(kind, model_dir, device, precision, resize="model", **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        if kind == "superpoint":
            return SuperPointDetector(str(model_dir), device=str(device), resize=resize,
                                      precision=precision, **kwargs)
        return EfficientLoFTRStreamMatcher(str(model_dir), device=str(device), resize=resize,
                                           precision=precision, **kwargs)


def time_path(kind, model, frames, runs, device, max_seconds):
    """Median seconds per call: a SuperPoint detect, or an EfficientLoFTR stream step (the
    older frame pushed untimed first, so only the step is timed)."""
    if kind == "superpoint":
        return timed_calls(model.detect, [(f,) for f in frames], runs, device, max_seconds)
    pairs = [(frames[k], frames[k + 1]) for k in range(len(frames) - 1)]

    def step(older, newer):
        model.reset()
        model.push(older)
        sync(device)
        start = time.perf_counter()
        model.push(newer)
        sync(device)
        step.elapsed.append(time.perf_counter() - start)
    step.elapsed = []
    _, slow = timed_calls(step, pairs, runs, device, max_seconds)
    return (step.elapsed[:1] if slow else step.elapsed[1:]), slow


def step_gflop(kind, model, frames):
    if kind == "superpoint":
        return count_gflop(model.detect, frames[0])
    model.reset()
    model.push(frames[0])
    flop = count_gflop(model.push, frames[1])
    model.reset()
    return flop


# --- report ----------------------------------------------------------------------------------

def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per path (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default=None,
                        help="comma list (default: fp32,bf16 on CPU; fp32,bf16,fp16 on CUDA)")
    parser.add_argument("--resolutions", default="480x640,720x1280,1080x1920",
                        help="HxW list for the scaling table and plot ('' to skip)")
    parser.add_argument("--frame-size", default="480x640",
                        help="HxW of the frames of the main table (a smaller one for a quick check)")
    parser.add_argument("--resize", choices=("model", "native"), default="model",
                        help="the kp_ros paths' resize in the main table (model: 640x480 whatever the frames)")
    parser.add_argument("--scaling-models", default="superpoint,eloftr",
                        help="models in the resolution table (e.g. 'eloftr' for the 1080p step only)")
    parser.add_argument("--max-call-seconds", type=float, default=60.0,
                        help="a call slower than this is timed once and not run at larger sizes "
                             "(60: fp32 EfficientLoFTR at 1080p on 2 CPU cores still runs, ~1 min)")
    parser.add_argument("--ceiling-seconds", type=float, default=2.0,
                        help="time budget per kernel of the machine-ceiling measurement")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed pipelines")
    parser.add_argument("--out", type=Path, help="also write DIR/precision.{md,json} and DIR/precision_scaling.png")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)  # random weights make denormals (8x slower kernels)
    device = resolve_device(args.device)
    precisions = (args.precisions.split(",") if args.precisions else
                  ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else []))
    if device.type == "cpu":
        precisions = [p for p in precisions if p != "fp16"]  # fp16 is CUDA-only in kp_ros
    frames, source = load_frames()
    frame_size = tuple(int(v) for v in args.frame_size.split("x"))
    frames = resized(frames, frame_size)
    native, what = cpu_bf16_support() if device.type == "cpu" else (True, str(device))
    lines = [f"Device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"{what}. Frames: {source}; {args.size} random-init models; median of {args.runs} "
             f"calls after a warm-up. Load average at start: {load_average()}.", ""]
    results = {"device": str(device), "frame_size": args.frame_size, "native_bf16": native, "bf16": what,
               "size": args.size,
               "threads": torch.get_num_threads(), "paths": {}, "scaling": {}}

    peak = ceilings(device, precisions, args.ceiling_seconds)
    results["ceilings"] = peak
    lines += ["Machine ceilings (best of short runs): " + "; ".join(
        f"{name} matmul {v['matmul']:.3g} GFLOP/s, 3x3 conv {v['conv3x3']:.3g} GFLOP/s"
        for name, v in peak.items()), ""]

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"superpoint": save_random_superpoint(Path(tmp) / "sp", args.size, seed=0),
                "eloftr": save_random_eloftr(Path(tmp) / "lo", args.size, seed=0)}
        # -- 640x480: seed vs each precision, FLOPs, ceilings, agreement --
        models = (("superpoint", "SuperPoint", "frame"), ("eloftr", "EfficientLoFTR", "stream step"))
        # Both seeds before any kp_ros model is loaded: loading one keeps per-frame blocks
        # in the heap from then on, process-wide (kp_ros/core/cpu_heap.py), which the seed
        # pipeline does not do.
        seed_rows, seed_times = {}, {}
        for kind, label, unit in models if not args.no_seed else ():
            seed = (SeedSuperPoint if kind == "superpoint" else SeedEfficientLoFTR)(dirs[kind], device)
            calls = [(f,) for f in frames] if kind == "superpoint" else \
                [(frames[k], frames[k + 1]) for k in range(len(frames) - 1)]
            times, _ = timed_calls(seed, calls, args.runs, device, float("inf"))
            gflop = count_gflop(seed, *calls[0])
            seed_times[kind] = seed_ms = 1e3 * float(np.median(times))
            results["paths"][f"{kind}/seed"] = {"ms": seed_ms, "gflop": gflop}
            seed_rows[kind] = row(f"{label} seed pipeline (fp32, per {'frame' if kind == 'superpoint' else 'pair'})",
                                  seed_ms, seed_ms, gflop, peak.get("fp32", {}), False, "")
            del seed
        rows = []
        for kind, label, unit in models:
            seed_ms = seed_times.get(kind)
            if kind in seed_rows:
                rows.append(seed_rows[kind])
            outputs, gflop = {}, None
            for name in precisions:
                model = build(kind, dirs[kind], device, name, resize=args.resize,
                              **({"max_keypoints": 1024} if kind == "superpoint" else {"match_threshold": 0.0}))
                if gflop is None:
                    gflop = step_gflop(kind, model, frames)
                with PeakMemory(device) as peak_memory:
                    times, slow = time_path(kind, model, frames, args.runs, device, args.max_call_seconds)
                ms = 1e3 * float(np.median(times))
                outputs[name] = model.detect(frames[0]) if kind == "superpoint" else \
                    model.match_pair(frames[0], frames[1])
                agree = ""
                if name != "fp32" and "fp32" in outputs:
                    if kind == "superpoint":
                        a = keypoint_agreement(outputs["fp32"], outputs[name])
                        agree = (f"{100 * a['recall']:.1f} % of fp32 keypoints within 1 px, "
                                 f"descriptor cosine median {a['cosine_median']:.5f}")
                    else:
                        a = match_agreement(outputs["fp32"], outputs[name])
                        agree = (f"mutual-NN IoU {a['iou']:.3f} ({a['count'][0]} / {a['count'][1]} "
                                 f"matches), shared moved median {a['position_median']:.2f} px")
                    results["paths"].setdefault(f"{kind}/{name}", {})["agreement"] = a
                results["paths"].setdefault(f"{kind}/{name}", {}).update(
                    {"ms": ms, "gflop": gflop, "runs": len(times), "slow": slow, "peak_mib": peak_memory.mib})
                rows.append(row(f"{label} kp_ros {name} (per {unit}){peak_text(peak_memory.mib)}",
                                ms, seed_ms, gflop,
                                peak.get(name, {}), slow, agree))
                print(rows[-1], file=sys.stderr, flush=True)  # progress: emulated bf16 takes minutes
                del model
        lines += [f"| path, {frame_size[1]}x{frame_size[0]} | ms per call | vs seed | GFLOP per call | GFLOP/s | "
                  "ceiling GFLOP/s (best of matmul, conv) | % of ceiling | agreement with fp32 |",
                  "|---|---:|---:|---:|---:|---:|---:|---|", *rows, ""]

        # -- resolution scaling --
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.resolutions.split(",") if s]
        if sizes:
            lines += ["Time per call vs resolution (`resize: native`; ms, GFLOP per call):", "",
                      "| path | " + " | ".join(f"{w}x{h}" for h, w in sizes) + " |",
                      "|---|" + "---:|" * len(sizes)]
            scaling_models = args.scaling_models.split(",")
            for kind, label in (("superpoint", "SuperPoint"), ("eloftr", "EfficientLoFTR step")):
                if kind not in scaling_models:
                    continue
                for name in precisions:
                    model = build(kind, dirs[kind], device, name, resize="native",
                                  **({"max_keypoints": 1024} if kind == "superpoint" else {"match_threshold": 0.0}))
                    cells, series, skip = [], [], False
                    for size in sizes:
                        if skip:
                            cells.append("skipped (slower than --max-call-seconds at a smaller size)")
                            continue
                        scaled = resized(frames[:3], size)
                        gflop = step_gflop(kind, model, scaled) if name == precisions[0] else \
                            results["scaling"].get(f"{kind}/{precisions[0]}", {}
                                                   ).get(f"{size[0]}x{size[1]}", {}).get("gflop", float("nan"))
                        with PeakMemory(device) as peak_memory:
                            times, slow = time_path(kind, model, scaled, max(
                                1, args.runs - 1), device, args.max_call_seconds)
                        ms = 1e3 * float(np.median(times))
                        skip = slow
                        results["scaling"].setdefault(f"{kind}/{name}", {})[f"{size[0]}x{size[1]}"] = \
                            {"ms": ms, "gflop": gflop, "slow": slow, "peak_mib": peak_memory.mib}
                        series.append((size[0] * size[1] / 1e6, ms))
                        cells.append(f"{ms:.0f} ms, {gflop:.3g} GFLOP ({gflop / ms * 1e3:.3g} GFLOP/s)"
                                     + peak_text(peak_memory.mib) + (" (1 run)" if slow else ""))
                    lines.append(f"| {label} {name} | " + " | ".join(cells) + " |")
                    print(lines[-1], file=sys.stderr, flush=True)
                    del model
            lines.append("")
    lines.append(f"Load average at the end: {load_average()} (a shared machine: compare within one run).")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "precision.md").write_text(text + "\n")
        (args.out / "precision.json").write_text(json.dumps(results, indent=1, default=str))
        if results["scaling"]:
            plot_scaling(results["scaling"], args.out / "precision_scaling.png", str(device))
    return text


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def row(label, ms, seed_ms, gflop, peak, slow, agree) -> str:
    rate = gflop / ms * 1e3
    # The best measured kernel of the dtype is the limit (emulated bf16 convolutions beat
    # emulated bf16 matmuls; natively the matmul is the higher one).
    ceiling = max(peak.get("matmul", float("nan")), peak.get("conv3x3", float("nan")))
    ratio = f"{seed_ms / ms:.2f}x" if seed_ms else "-"
    return (f"| {label} | {ms:.0f}{' (1 run)' if slow else ''} | {ratio} | {gflop:.3g} | {rate:.3g} | "
            f"{ceiling:.3g} | {100 * rate / ceiling:.0f} % | {agree} |")


def plot_scaling(scaling: dict, path: Path, device: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, by_size in sorted(scaling.items()):
        points = sorted((int(s.split("x")[0]) * int(s.split("x")[1]) / 1e6, v["ms"]) for s, v in by_size.items())
        ax.plot(*zip(*points), marker="o", label=key.replace("/", " "),
                linestyle="--" if "bf16" in key or "fp16" in key else "-")
    ax.set_xlabel("megapixels per frame")
    ax.set_ylabel("ms per call")
    ax.set_yscale("log")
    ax.set_title(f"time vs resolution ({device})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
