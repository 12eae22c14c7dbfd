"""EfficientLoFTR stream step, old vs new, per resolution: time, GFLOP/s, % of the machine's
ceiling and PEAK MEMORY, in one run.

    python bench/bench_eloftr_scaling.py [--quick] [--runs N] [--device cpu]
        [--precisions fp32,bf16] [--resolutions 480x640,720x1280,1080x1920] [--out DIR]

Paths (same random-init full-size weights, same TUM frames resized, ``resize: native``,
threshold 0):
  - seed: transformers' processor -> model -> post-process per pair (fp32, 640x480 only),
  - old:  ``EfficientLoFTRStreamMatcher(reparameterize=False, coarse_chunk_bytes=0)``, the
          unfused RepVGG blocks and the whole (h/8 w/8)^2 dual-softmax matrices,
  - new:  the default matcher: folded backbone / fine fusion, coarse matching in row blocks,
          the fine stage on tiles where that is cheaper, the transformer MLPs and the
          coarse products as oneDNN 1x1 convolutions on CPU, per-frame blocks kept in
          the heap (kp_ros/core/cpu_heap.py); "new, KP_ROS_RETAIN_HEAP=0" without that,
          "every inner cell matched" its fine stage's worst case.
--paths picks a subset (default: all).
Each (path, precision, resolution) runs in a fresh subprocess, so its peak memory is its
own: ru_maxrss of that process (model, frames and the warm-up steps included; the RSS
before the first step is given too), or torch.cuda.max_memory_allocated on CUDA. GFLOP
per step from torch's FLOP counter (the new path counts fewer: the folded 1x1 branches).
Ceilings: the best of a 1024^3 matmul and a 3x3 64->64 convolution per dtype (as in
bench_precision.py). The old path is not run at 1920x1080 (its dual softmax holds
several 32 400^2 float matrices, ~17 GB); its matrix size is given instead. A new-path
resolution runs only if the previous one's peak, scaled by the pixel count, stays under
--max-peak-gb.

--quick: one timed step per point, fp32 only, 640x480 and 1280x720. Timings on a shared
machine are noisy: compare rows of one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_precision import (SeedEfficientLoFTR, ceilings, count_gflop, load_average,  # noqa: E402
                             load_frames, resized, sync)
from kp_ros.core.precision import PrecisionWarning, cpu_bf16_support  # noqa: E402

# name: (label, matcher keywords, environment); the seed and the old path run with glibc's
# default malloc, as before kp_ros kept per-frame blocks in the heap; "seed-heap" shows what
# that setting alone gives the seed.
PATHS = {
    "seed": ("seed pipeline, per pair", None, {"KP_ROS_RETAIN_HEAP": "0"}),
    "seed-heap": ("seed pipeline, per pair, heap kept", None, {"KP_ROS_RETAIN_HEAP": "1"}),
    "old": ("old (unfused, whole matrix, default malloc)", {"reparameterize": False, "coarse_chunk_bytes": 0},
            {"KP_ROS_RETAIN_HEAP": "0"}),
    "new": ("new (default matcher)", {}, {"KP_ROS_RETAIN_HEAP": "1"}),
    "new-malloc": ("new, KP_ROS_RETAIN_HEAP=0", {}, {"KP_ROS_RETAIN_HEAP": "0"}),
    "new-all": ("new, every inner cell matched (the fine stage's worst case)", {}, {"KP_ROS_RETAIN_HEAP": "1"}),
}


def every_cell_matcher():
    """The default matcher with the real coarse matching's cost, then every inner cell
    matched to itself: the most fine-stage work a step can have (random weights match ~1)."""
    from kp_ros.core.eloftr import CoarseMatches, EfficientLoFTRStreamMatcher
    from kp_ros.core.eloftr_ops import inner_cells

    class EveryCellMatched(EfficientLoFTRStreamMatcher):
        def match_coarse(self, coarse0, coarse1, threshold=None):
            super().match_coarse(coarse0, coarse1, threshold)
            height, width = coarse0.shape[-2:]
            border = self.config.coarse_matching_border_removal
            ids = torch.nonzero(inner_cells(height, width, border, coarse0.device))[:, 0]
            return CoarseMatches(ids, ids, torch.ones(len(ids), device=coarse0.device))
    return EveryCellMatched


# --- one point, in its own process -------------------------------------------------------------

# Untimed steps first: the first pays oneDNN's kernel set-up, the first few grow the heap
# the process then keeps (kp_ros/core/cpu_heap.py), each a little slower than the steady
# state a stream runs in; their times are in the JSON (warm_up_ms).
WARM_UP_STEPS = 2


def child(args) -> dict:
    torch.set_flush_denormal(True)
    from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher
    device = torch.device(args.device)
    height, width = (int(v) for v in args.size.split("x"))
    frames = resized(load_frames(3)[0], (height, width))
    if args.path.startswith("seed"):
        from kp_ros.core.cpu_heap import retain_freed_memory
        retain_freed_memory()  # as kp_ros's model loading does (a no-op with KP_ROS_RETAIN_HEAP=0)
        model = SeedEfficientLoFTR(args.model, device)

        def step(older, newer):
            return model(older, newer)
    else:
        matcher = every_cell_matcher() if args.path == "new-all" else EfficientLoFTRStreamMatcher
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)
            model = matcher(args.model, device=str(device), resize="native", precision=args.precision,
                            match_threshold=0.0, **PATHS[args.path][1])

        def step(older, newer):
            model.reset()
            model.push(older)
            sync(device)
            start = time.perf_counter()
            result = model.push(newer)
            sync(device)
            step.elapsed = time.perf_counter() - start
            return result
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, matches = [], 0
    with torch.inference_mode():
        for k in range(WARM_UP_STEPS + args.runs):
            older, newer = frames[k % 2], frames[k % 2 + 1]
            start = time.perf_counter()
            result = step(older, newer)
            sync(device)
            times.append(getattr(step, "elapsed", time.perf_counter() - start))
            matches = len(result["scores"] if "scores" in result else result["matching_scores"])
    warm_up, times = times[:WARM_UP_STEPS], times[WARM_UP_STEPS:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    if args.path.startswith("seed"):
        gflop = count_gflop(step, frames[0], frames[1])
    else:
        model.reset()
        model.push(frames[0])
        gflop = count_gflop(model.push, frames[1])
    return {"ms": 1e3 * float(np.median(times)), "runs": len(times), "warm_up_ms": [1e3 * t for t in warm_up],
            "gflop": gflop,
            "peak_gb": peak, "rss_before_gb": rss_before, "cuda_peak_gb": cuda_peak, "matches": matches}


def run_child(model_dir, path, precision, size, runs, device) -> dict:
    command = [sys.executable, __file__, "--child", "--model", str(model_dir), "--path", path,
               "--precision", precision, "--size", f"{size[0]}x{size[1]}", "--runs", str(runs),
               "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **PATHS[path][2]})
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the report --------------------------------------------------------------------------------

def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 run, fp32, 640x480 and 1280x720")
    parser.add_argument("--runs", type=int, default=3, help="timed steps per point (after WARM_UP_STEPS untimed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--resolutions", default="480x640,720x1280,1080x1920")
    parser.add_argument("--max-peak-gb", type=float, default=4.0,
                        help="skip a new-path resolution whose estimated peak is above this")
    parser.add_argument("--no-seed", action="store_true")
    parser.add_argument("--paths", default=",".join(PATHS), help="a subset of: " + ", ".join(PATHS))
    parser.add_argument("--out", type=Path, help="also write DIR/eloftr_scaling.{md,json}")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return ""
    if args.quick:
        args.runs, args.precisions, args.resolutions = 1, "fp32", "480x640,720x1280"
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    precisions = [p for p in args.precisions.split(",") if p]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.resolutions.split(",") if s]
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"--paths: unknown {', '.join(sorted(unknown))} (known: {', '.join(PATHS)})")
    native, what = cpu_bf16_support() if device.type == "cpu" else (True, str(device))
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss of the process"
    lines = [f"Device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; {what}. "
             f"Full-size random-init EfficientLoFTR, TUM frames resized, threshold 0; median of "
             f"{args.runs} stream steps after {WARM_UP_STEPS} untimed ones, each point a fresh process. "
             f"Load average at start: {load_average()}.", ""]
    peak = ceilings(device, [p for p in precisions if not (device.type == "cpu" and p == "fp16")])
    lines += ["Machine ceilings (best of short runs): " + "; ".join(
        f"{name} matmul {v['matmul']:.3g} GFLOP/s, 3x3 conv {v['conv3x3']:.3g} GFLOP/s"
        for name, v in peak.items()), ""]
    results = {"device": str(device), "native_bf16": native, "ceilings": peak, "points": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from kp_ros.core.random_init import save_random_eloftr
        model_dir = save_random_eloftr(Path(tmp) / "eloftr", "full", seed=0)
        seed_ms = None
        if not args.no_seed and (480, 640) in sizes:
            for path in [p for p in ("seed", "seed-heap") if p in paths]:
                seed = run_child(model_dir, path, "fp32", (480, 640), args.runs, args.device)
                results["points"][f"{path}/fp32/480x640"] = seed
                if path == "seed" and "ms" in seed:
                    seed_ms = seed["ms"]
                rows.append(table_row(PATHS[path][0], "fp32", (480, 640), seed, peak, seed_ms))
                print(rows[-1], file=sys.stderr, flush=True)
        for precision in precisions:
            estimate = None
            for size in sizes:
                for path in [p for p in ("old", "new", "new-malloc", "new-all") if p in paths]:
                    row = skipped(path, precision, size, estimate, args.max_peak_gb)
                    if row:
                        rows.append(row)
                        continue
                    point = run_child(model_dir, path, precision, size, args.runs, args.device)
                    results["points"][f"{path}/{precision}/{size[0]}x{size[1]}"] = point
                    rows.append(table_row(PATHS[path][0], precision, size, point, peak,
                                          seed_ms if size == (480, 640) else None))
                    print(rows[-1], file=sys.stderr, flush=True)
                    if path == "new" and "peak_gb" in point:
                        key = "cuda_peak_gb" if point.get("cuda_peak_gb") is not None else "peak_gb"
                        base = 0.0 if key == "cuda_peak_gb" else point["rss_before_gb"]
                        estimate = base + (point[key] - base) * 2.25 * 1.1  # next size ~2.25x the pixels
    lines += [f"| path | precision | resolution | ms per step | vs seed | GFLOP per step | GFLOP/s | "
              f"% of ceiling | peak memory GiB ({memory}; RSS before the first step) | matches |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
              f"Load average at the end: {load_average()} (a shared machine: compare within one run)."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eloftr_scaling.md").write_text(text + "\n")
        (args.out / "eloftr_scaling.json").write_text(json.dumps(results, indent=1))
    return text


def skipped(path, precision, size, estimate, max_peak_gb) -> str | None:
    """The table row of a point not run (None: run it)."""
    label, resolution, cells = PATHS[path][0], f"{size[1]}x{size[0]}", (size[0] // 8) * (size[1] // 8)
    if path == "old" and size[0] * size[1] > 1280 * 720:
        return (f"| {label} | {precision} | {resolution} | not run: its dual softmax holds {cells}^2 floats = "
                f"{4 * cells ** 2 / 2 ** 30:.1f} GiB per matrix (several at once) | | | | | |")
    if path.startswith("new") and estimate is not None and estimate > max_peak_gb:
        return (f"| {label} | {precision} | {resolution} | not run: estimated peak {estimate:.1f} GiB > "
                f"--max-peak-gb | | | | | |")
    return None


def table_row(label, precision, size, point, peak, seed_ms) -> str:
    resolution = f"{size[1]}x{size[0]}"
    if "error" in point:
        return f"| {label} | {precision} | {resolution} | failed: {point['error'][:120]} | | | | | |"
    rate = point["gflop"] / point["ms"] * 1e3
    limits = peak.get(precision, {})
    ceiling = max(limits.get("matmul", float("nan")), limits.get("conv3x3", float("nan")))
    ratio = f"{seed_ms / point['ms']:.2f}x" if seed_ms else "-"
    memory = point["cuda_peak_gb"] if point.get("cuda_peak_gb") is not None else point["peak_gb"]
    return (f"| {label} | {precision} | {resolution} | {point['ms']:.0f} | {ratio} | {point['gflop']:.4g} | "
            f"{rate:.3g} | {100 * rate / ceiling:.0f} % | {memory:.2f} ({point['rss_before_gb']:.2f}) | "
            f"{point['matches']} |")


if __name__ == "__main__":
    main()
