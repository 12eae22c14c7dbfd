"""LightGlue on CPU: kp_ros's sparse step (published keypoints in, matches out) against the
reference pipeline (processor -> LightGlueForKeypointMatching, which re-runs SuperPoint
on both images -> post_process), in one run, at 512 / 1024 / 2048 keypoints, fp32 and
bf16. Full-size random-init weights; depth_confidence = width_confidence = 1.0 so every
layer runs on every point (random weights would otherwise stop at an arbitrary layer), the
worst case of the adaptive model. Compare rows of one run only (shared machine).

    python bench/bench_lightglue.py [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from transformers import AutoImageProcessor, LightGlueForKeypointMatching

    from kp_ros.core.lightglue import LightGlueStreamMatcher
    from kp_ros.core.random_init import save_random_lightglue

    rng = np.random.default_rng(0)
    images = [(rng.random((480, 640, 3)) * 255).astype(np.uint8) for _ in range(2)]
    with tempfile.TemporaryDirectory() as directory:
        save_random_lightglue(directory, "full")
        processor = AutoImageProcessor.from_pretrained(directory)
        reference = LightGlueForKeypointMatching.from_pretrained(directory).eval()
        reference.depth_confidence = reference.width_confidence = 1.0
        reference.filter_threshold = 0.0
        reference.keypoint_detector.keypoint_threshold = 0.0
        matchers = {p: LightGlueStreamMatcher(directory, device="cpu", precision=p,
                                              filter_threshold=0.0, depth_confidence=1.0,
                                              width_confidence=1.0) for p in ("fp32", "bf16")}
        print(f"{'keypoints':>9} {'reference (2x SuperPoint + LightGlue)':>38} "
              f"{'kp_ros fp32':>12} {'kp_ros bf16':>12}  (ms, best of {args.repeats})")
        for n in args.sizes:
            reference.keypoint_detector.max_keypoints = n

            def run_reference():
                with torch.inference_mode():
                    out = reference(**processor([images], return_tensors="pt"))
                    processor.post_process_keypoint_matching(out, [[(480, 640)] * 2])

            frames = [{"keypoints": rng.random((n, 2), dtype=np.float32) * [640, 480],
                       "descriptors": _unit(rng.standard_normal((n, 256)).astype(np.float32))}
                      for _ in range(2)]
            row = [best_of(run_reference, args.repeats)]
            for matcher in matchers.values():
                row.append(best_of(lambda: matcher.match_pair(frames[0], frames[1], (480, 640)),
                                   args.repeats))
            print(f"{n:>9} {row[0]:>38.1f} {row[1]:>12.1f} {row[2]:>12.1f}")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


if __name__ == "__main__":
    main()
