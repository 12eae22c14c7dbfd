"""LightGlue on CPU: kp_ros's sparse step (published keypoints in, matches out) against the
reference pipeline (processor -> LightGlueForKeypointMatching, which re-runs SuperPoint
on both images -> post_process), in one run, at 512 / 1024 / 2048 keypoints, fp32 and
bf16; in the same run EfficientLoFTR's stream step (``push`` of a 640x480 frame, the
previous frame's features kept) and the end-to-end rate of superpoint_node ->
lightglue_node as real processes fed 640x480 frames (TUM from ../shared, else synthetic).
Full-size random-init weights; depth_confidence = width_confidence = 1.0 so every
layer runs on every point (random weights would otherwise stop at an arbitrary layer), the
worst case of the adaptive model. Compare rows of one run only (shared machine).

    python bench/bench_lightglue.py [--quick] [--repeats 3] [--threads 2] [--no-live]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's kp_ros, not a copy installed in the venv
    sys.path.insert(0, str(REPO))


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
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="keypoints per frame (default 512 1024 2048; --quick: 512 1024)")
    parser.add_argument("--quick", action="store_true",
                        help="one timed repeat, 512 / 1024 keypoints, a 12 s live run (< 3 min)")
    parser.add_argument("--no-live", dest="live", action="store_false",
                        help="skip the superpoint_node -> lightglue_node run")
    parser.add_argument("--live-seconds", type=float, default=None)
    parser.add_argument("--live-rate", type=float, default=4.0, help="frames/s published")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    sizes = args.sizes or ([512, 1024] if args.quick else [512, 1024, 2048])
    live_seconds = args.live_seconds or (12.0 if args.quick else 30.0)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from transformers import AutoImageProcessor, LightGlueForKeypointMatching

    from kp_ros.core.lightglue import LightGlueStreamMatcher
    from kp_ros.core.random_init import save_random_lightglue

    rng = np.random.default_rng(0)
    images = [(rng.random((480, 640, 3)) * 255).astype(np.uint8) for _ in range(2)]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        save_random_lightglue(directory, "full")
        processor = AutoImageProcessor.from_pretrained(directory)
        reference = LightGlueForKeypointMatching.from_pretrained(directory).eval()
        reference.depth_confidence = reference.width_confidence = 1.0
        reference.filter_threshold = 0.0
        reference.keypoint_detector.keypoint_decoder.keypoint_threshold = 0.0
        matchers = {p: LightGlueStreamMatcher(directory, device="cpu", precision=p,
                                              filter_threshold=0.0, depth_confidence=1.0,
                                              width_confidence=1.0) for p in ("fp32", "bf16")}
        for n in sizes:
            reference.keypoint_detector.keypoint_decoder.max_keypoints = n

            def run_reference():
                with torch.inference_mode():
                    out = reference(**processor([images], return_tensors="pt"))
                    processor.post_process_keypoint_matching(out, [[(480, 640)] * 2])

            frames = [{"keypoints": rng.random((n, 2), dtype=np.float32) * [640, 480],
                       "descriptors": _unit(rng.standard_normal((n, 256)).astype(np.float32))}
                      for _ in range(2)]
            row = [f"LightGlue, {n} keypoints", best_of(run_reference, repeats)]
            for matcher in matchers.values():
                row.append(best_of(lambda: matcher.match_pair(frames[0], frames[1], (480, 640)), repeats))
            rows.append(row)
    rows.append(["EfficientLoFTR stream step, 640x480", None,
                 *eloftr_step(repeats, ("fp32", "bf16"))])
    print(f"\nCPU, {args.threads} threads, ms, best of {repeats} (full-size random-init weights)")
    print(f"{'step':<38} {'reference (2x SuperPoint + LightGlue)':>38} {'kp_ros fp32':>12} {'kp_ros bf16':>12}")
    for name, ref, fp32, bf16 in rows:
        print(f"{name:<38} {'' if ref is None else f'{ref:.1f}':>38} {fp32:>12.1f} {bf16:>12.1f}")
    if args.live:
        print()
        live_rate(live_seconds, args.live_rate, args.threads)


def eloftr_step(repeats: int, precisions) -> list[float]:
    """EfficientLoFTRStreamMatcher.push of a 640x480 frame after its predecessor (whose
    backbone features the stream keeps), as bench_eloftr.py times it."""
    from bench_live import load_frames
    from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher
    from kp_ros.core.random_init import save_random_eloftr
    frames, _ = load_frames(3)
    times = []
    with tempfile.TemporaryDirectory() as directory:
        save_random_eloftr(directory, "full")
        for precision in precisions:
            matcher = EfficientLoFTRStreamMatcher(directory, device="cpu", precision=precision)

            def step():
                matcher.reset()
                matcher.push(frames[0])  # untimed in a stream: the previous step's frame
                started = time.perf_counter()
                matcher.push(frames[1])
                return time.perf_counter() - started
            step()  # warm-up
            times.append(min(step() for _ in range(repeats)) * 1e3)
    return times


def live_rate(seconds: float, rate: float, threads: int) -> None:
    """superpoint_node -> lightglue_node, each its own process as the launch file starts
    them (full-size random-init weights, max_keypoints 1024), fed 640x480 frames at
    ``rate`` Hz for ``seconds``: Matches received per second, latency, the nodes' counters."""
    import os
    from bench_live import StreamClient, image_messages, load_frames, percentiles_ms, setup_env
    from kp_ros import msg as kp_msgs
    from kp_ros.core.random_init import save_random_lightglue, save_random_superpoint
    from kp_ros.testing import node_process

    setup_env(domain_id=1 + (os.getpid() + 37) % 100)
    frames, source = load_frames(17)
    namespace = "/kp_bench_sparse"
    nodes = (("superpoint_node", save_random_superpoint, {"max_keypoints": 1024}),
             ("lightglue_node", save_random_lightglue,
              {"filter_threshold": 0.0, "depth_confidence": 1.0, "width_confidence": 1.0,
               "max_frame_gap": 0.0}))  # slow CPU rates space processed frames > 1.5 s apart
    with tempfile.TemporaryDirectory() as directory:
        processes = []
        client = StreamClient(f"{namespace}/image", {
            "matches": (f"{namespace}/matches", kp_msgs.Matches, "x0"),
            "keypoints": (f"{namespace}/keypoints", kp_msgs.Keypoints, "x")})
        try:
            for executable, save, params in nodes:
                model = save(Path(directory) / executable, "full", seed=0)
                processes.append(node_process.start_node(
                    executable, Path(directory) / f"{executable}.log", namespace=namespace,
                    params={"model": str(model), "device": "cpu", "diagnostics_period": 0.5, **params},
                    params_file=REPO / "config" / "matcher.yaml",
                    env=node_process.node_env(source_root=REPO, threads=threads), cwd=REPO))
            for executable, _, _ in nodes:
                problem = client.wait_ready(f"{namespace}/{executable}", [], 180.0)
                if problem:
                    raise RuntimeError(f"{executable} did not come up: {problem}")
            while client.image_pub.get_subscription_count() < 1:
                time.sleep(0.1)
            messages = image_messages(frames)
            client.stream(messages, rate, min(5.0, seconds / 2))  # warm-up: first frames are slow
            time.sleep(3.0)
            count, start, end = client.stream(messages, rate, seconds)
            time.sleep(5.0)  # the frames in flight
            matches = client.outputs_between("matches", start, end)
            keypoints = client.outputs_between("keypoints", start, end)
            counters = {executable: client.diagnostics.get(f"{namespace}/{executable}", [(0, {})])[-1][1]
                        for executable, _, _ in nodes}
        finally:
            node_process.stop_nodes(processes)
            client.close()
    latency = percentiles_ms([arrived - sent for sent, arrived, _ in matches])
    print(f"superpoint_node -> lightglue_node, {source}, {rate:g} Hz in for {seconds:g} s "
          f"({count} frames), {threads} threads per node:")
    print(f"  Keypoints {len(keypoints) / (end - start):.2f} /s, Matches {len(matches) / (end - start):.2f} /s "
          f"(mean {np.mean([n for _, _, n in matches]) if matches else 0:.0f} matches), "
          f"frame -> Matches latency median {latency['median'] or 0:.0f} ms, p95 {latency['p95'] or 0:.0f} ms")
    for executable, counts in counters.items():
        print(f"  {executable} since start: {counts}")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


if __name__ == "__main__":
    main()
