"""EfficientLoFTR: kp_ros stream step vs the reference pipeline run per pair, same weights/frames.

    python bench/bench_eloftr.py [--size tiny|full] [--runs N] [--device cpu] [--out DIR]

Reference = AutoImageProcessor -> EfficientLoFTRForKeypointMatching (torch.no_grad) ->
processor.post_process_keypoint_matching, on each consecutive pair. kp_ros = one
``EfficientLoFTRStreamMatcher.push`` per frame: the backbone runs on the new frame only
(the older frame's features are cached); attention, coarse matching and the fine stages
need both frames and run every step. Random-init weights (no hub access here): match
counts are not those of the trained model, the work per pair is the same.

Agreement: the coarse confidence, mutual-NN pairs and scores are compared with the
reference's (they must be equal on any pair). Final keypoints cannot be: the reference
pairs slot p's image-0 match with slot p's image-1 match and gathers its stage-1 fine
offsets along the wrong axis (see kp_ros/core/eloftr.py); the table counts how many of
its rows are consistent pairs. Wall times on a shared CPU are noisy: runs alternate
between the two pipelines and both median and best are given.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher  # noqa: E402
from kp_ros.core.random_init import save_random_eloftr  # noqa: E402

TUM_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tum_fr3_long_office_household"
REFERENCE_STAGES = ("preprocess", "backbone", "coarse attention", "coarse matching",
                    "fine fusion", "fine matching", "other", "post-process")
KP_ROS_STAGES = {"preprocess": "preprocess", "extract": "backbone", "transform": "coarse attention",
                 "match_coarse": "coarse matching", "fine_windows": "fine fusion",
                 "refine_windows": "fine matching", "finish": "post-process"}


def load_frames(count: int) -> tuple[list[np.ndarray], str]:
    paths = sorted(TUM_DIR.glob("*.png"))[:count] if TUM_DIR.is_dir() else []
    if paths:
        from PIL import Image
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths], f"TUM fr3, 640x480 ({len(paths)} frames)"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
    from conftest import synthetic_frame
    frames = [synthetic_frame(480, 640, seed=0, shift=(4 * i, 2 * i)) for i in range(count)]
    return frames, f"synthetic 640x480 ({count} frames; TUM frames not found at {TUM_DIR})"


class StageClock:
    """Accumulates wall time per named stage; ``lap`` reads and clears it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = defaultdict(float)

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, owner, attribute: str, stage: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = self.now()
            try:
                return inner(*args, **kwargs)
            finally:
                self.times[stage] += self.now() - start
        setattr(owner, attribute, timed)

    def wrap_module(self, module: torch.nn.Module, stage: str) -> None:
        starts = []
        module.register_forward_pre_hook(lambda *_: starts.append(self.now()))
        module.register_forward_hook(
            lambda *_: self.times.__setitem__(stage, self.times[stage] + self.now() - starts.pop()))

    def lap(self) -> dict[str, float]:
        times, self.times = dict(self.times), defaultdict(float)
        return times


class Reference:
    def __init__(self, model_dir: Path, device: torch.device, threshold: float, clock: StageClock):
        from transformers import AutoImageProcessor, EfficientLoFTRForKeypointMatching
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir))
        self.model = EfficientLoFTRForKeypointMatching.from_pretrained(str(model_dir)).to(device).eval()
        self.model.config.coarse_matching_threshold = threshold
        self.device, self.threshold, self.clock = device, threshold, clock
        self.recorded = {}
        clock.wrap_module(self.model.efficientloftr.backbone, "backbone")
        clock.wrap_module(self.model.efficientloftr.local_feature_transformer, "coarse attention")
        clock.wrap_module(self.model.refinement_layer, "fine fusion")
        clock.wrap(self.model, "_coarse_matching", "coarse matching")
        clock.wrap(self.model, "_fine_matching", "fine matching")
        get_matches = self.model._get_matches_from_scores

        def record(scores):
            if self.recorded.get("on"):
                self.recorded["confidence"] = scores.clone()
            return get_matches(scores)
        self.model._get_matches_from_scores = record

    def __call__(self, image0, image1):
        clock = self.clock
        start = clock.now()
        inputs = self.processor([image0, image1], return_tensors="pt").to(self.device)
        clock.times["preprocess"] += clock.now() - start
        with torch.no_grad():
            start = clock.now()
            outputs = self.model(**inputs)
            clock.times["forward"] += clock.now() - start
        start = clock.now()
        result = self.processor.post_process_keypoint_matching(
            outputs, [[image0.shape[:2], image1.shape[:2]]], threshold=self.threshold)[0]
        clock.times["post-process"] += clock.now() - start
        return outputs, result


def instrument(matcher: EfficientLoFTRStreamMatcher, clock: StageClock) -> None:
    for method, stage in KP_ROS_STAGES.items():
        clock.wrap(matcher, method, stage)


def reference_stages(times: dict[str, float]) -> dict[str, float]:
    named = sum(times.get(s, 0.0) for s in ("backbone", "coarse attention", "coarse matching",
                                            "fine fusion", "fine matching"))
    times = dict(times)
    times["other"] = times.pop("forward") - named  # gathers, keypoint scaling, rotary tables
    return times


def timing(frames, reference, matcher, clock, runs: int):
    """Alternating runs: reference on pair (k-1, k), then kp_ros's push of frame k."""
    reference(frames[0], frames[1])  # warm-up (kernels, caches) for both
    matcher.push(frames[0])
    matcher.push(frames[1])
    clock.lap()
    reference_laps, stream_laps, counts = [], [], []
    for k in range(runs):
        older, newer = frames[k % (len(frames) - 1)], frames[k % (len(frames) - 1) + 1]
        reference(older, newer)
        reference_laps.append(reference_stages(clock.lap()))
        matcher.reset()
        matcher.push(older)  # untimed: in a stream this frame's features come from the previous step
        clock.lap()
        counts.append(len(matcher.push(newer)["scores"]))
        stream_laps.append(clock.lap())
    return reference_laps, stream_laps, counts


def agreement(frames, reference, matcher, threshold: float) -> list[str]:
    """Coarse confidence / mutual-NN pairs / scores vs the reference, at ``threshold``
    (0: every mutual nearest neighbour, so random weights give more than a handful)."""
    lines = []
    saved = matcher.params.match_threshold, reference.threshold
    matcher.set_params(match_threshold=threshold)
    reference.threshold = reference.model.config.coarse_matching_threshold = threshold
    with torch.inference_mode():
        for name, (image0, image1) in (("identity (frame 0 twice)", (frames[0], frames[0])),
                                       ("consecutive (frames 0, 1)", (frames[0], frames[1]))):
            reference.recorded["on"] = True
            outputs, expected = reference(image0, image1)
            reference.recorded["on"] = False
            features0 = matcher.extract(matcher.preprocess(image0))
            features1 = matcher.extract(matcher.preprocess(image1))
            coarse0, coarse1 = matcher.transform(features0, features1)
            confidence = matcher.coarse_confidence(coarse0, coarse1)
            matches = matcher.match_coarse(coarse0, coarse1)
            result = matcher.match_pair(image0, image1)
            recorded = reference.recorded["confidence"].reshape(confidence.shape)
            same_confidence = torch.equal(confidence.cpu(), recorded.cpu())
            slots = outputs.matches[0].cpu()
            ref_pairs = {(int(slots[0, p]), p) for p in range(slots.shape[1]) if slots[0, p] > -1}
            ours = set(zip(matches.i_ids.tolist(), matches.j_ids.tolist()))
            # A reference row k pairs column 0's k-th valid slot with column 1's k-th valid slot.
            rows0 = [int(slots[0, p]) for p in range(slots.shape[1]) if slots[0, p] > -1]
            rows1 = [int(slots[1, p]) for p in range(slots.shape[1]) if slots[1, p] > -1]
            consistent = sum((i, j) in ours for i, j in zip(rows0, rows1))
            lines.append(
                f"| {name} | {'equal' if same_confidence else 'DIFFERENT'} | "
                f"{'equal' if ref_pairs == ours else 'DIFFERENT'} ({len(ours)}) | "
                f"{consistent}/{len(rows0)} | {len(result['scores'])} / {len(expected['matching_scores'])} |")
    matcher.set_params(match_threshold=saved[0])
    reference.threshold = reference.model.config.coarse_matching_threshold = saved[1]
    return lines


def dense_fine_stages(matcher, frames, runs: int) -> list[float]:
    """kp_ros's fine fusion + fine matching with every inner cell matched: an upper bound
    for a trained model (random weights give only a few matches, so the measured step
    skips most of this work; the reference always refines every cell)."""
    from kp_ros.core.eloftr import CoarseMatches
    from kp_ros.core.eloftr_ops import inner_cells
    clock = StageClock(matcher.device)
    times = []
    with torch.inference_mode():
        features0 = matcher.extract(matcher.preprocess(frames[0]))
        features1 = matcher.extract(matcher.preprocess(frames[1]))
        coarse0, coarse1 = matcher.transform(features0, features1)
        height, width = coarse0.shape[-2:]
        ids = torch.nonzero(inner_cells(height, width, matcher.config.coarse_matching_border_removal,
                                        coarse0.device))[:, 0]
        everything = CoarseMatches(ids, ids, torch.ones(len(ids), device=ids.device))
        for _ in range(runs + 1):
            start = clock.now()
            fine0, fine1 = matcher.fine_maps(coarse0, coarse1, features0, features1)
            matcher.refine(fine0, fine1, everything, features0)
            times.append(clock.now() - start)
    return times[1:]


def backbone_options(matcher, frame, runs: int) -> list[str]:
    """One-frame backbone under no_grad, inference_mode, and inference_mode + channels_last."""
    backbone = matcher.model.efficientloftr.backbone
    pixels, _ = matcher.preprocess(frame)
    clock = StageClock(matcher.device)
    variants = {}
    for name, context, channels_last in (("torch.no_grad", torch.no_grad, False),
                                         ("torch.inference_mode", torch.inference_mode, False),
                                         ("inference_mode + channels_last", torch.inference_mode, True)):
        backbone.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        x = pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels
        times = []
        with context():
            backbone(x)  # warm-up
            for _ in range(runs):
                start = clock.now()
                out = backbone(x)[-1]
                times.append(clock.now() - start)
        variants[name] = (times, out)
    backbone.to(memory_format=torch.contiguous_format)
    base = variants["torch.no_grad"][1]
    lines = []
    for name, (times, out) in variants.items():
        diff = (out.float() - base.float()).abs().max().item() / max(base.abs().max().item(), 1e-12)
        lines.append(f"| {name} | {1000 * np.median(times):.0f} | {1000 * min(times):.0f} | {diff:.1e} |")
    return lines


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--runs", type=int, default=3, help="timed pairs per pipeline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--out", type=Path, help="also write DIR/eloftr.md")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)  # random weights produce denormals (~8x slower otherwise)

    frames, source = load_frames(max(args.runs + 1, 3))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_random_eloftr(Path(tmp) / "eloftr", args.size, seed=0)
        matcher = EfficientLoFTRStreamMatcher(str(model_dir), device=args.device,
                                              match_threshold=args.threshold)
        clock = StageClock(matcher.device)
        reference = Reference(model_dir, matcher.device, args.threshold, clock)
        agree = agreement(frames, reference, matcher, threshold=0.0)
        dense = dense_fine_stages(matcher, frames, args.runs)
        instrument(matcher, clock)
        reference_laps, stream_laps, counts = timing(frames, reference, matcher, clock, args.runs)
        options = backbone_options(matcher, frames[0], args.runs)

    def column(laps, stage):
        values = [lap.get(stage, 0.0) for lap in laps]
        return 1000 * float(np.median(values)), 1000 * min(values)

    ref_totals = [sum(lap.values()) for lap in reference_laps]
    stream_totals = [sum(lap.values()) for lap in stream_laps]
    lines = [f"## EfficientLoFTR ({args.size}, random init) - {source}, device {matcher.device}, "
             f"{torch.get_num_threads()} threads, {args.runs} runs, threshold {args.threshold}", "",
             "| stage | reference per pair, median / best (ms) | kp_ros stream step, median / best (ms) |",
             "|---|---|---|"]
    for stage in REFERENCE_STAGES:
        ref = column(reference_laps, stage)
        ours = column(stream_laps, stage) if stage in KP_ROS_STAGES.values() else None
        note = " (2 images)" if stage == "backbone" else ""
        lines.append(f"| {stage}{note} | {ref[0]:.0f} / {ref[1]:.0f} | "
                     + (f"{ours[0]:.0f} / {ours[1]:.0f}" if ours else "-")
                     + (" (1 image, other cached)" if stage == "backbone" else "") + " |")
    ref_median, ours_median = 1000 * np.median(ref_totals), 1000 * np.median(stream_totals)
    ref_best, ours_best = 1000 * min(ref_totals), 1000 * min(stream_totals)
    # Upper bound: the measured step with its fine stages replaced by the all-cells ones.
    fine = [lap.get("fine fusion", 0.0) + lap.get("fine matching", 0.0) for lap in stream_laps]
    bound = [total - f + d for total, f, d in zip(stream_totals, fine, dense)]
    bound_median, bound_best = 1000 * np.median(bound), 1000 * min(bound)
    matches = np.median(counts)
    lines += [f"| **total** | **{ref_median:.0f} / {ref_best:.0f}** | **{ours_median:.0f} / {ours_best:.0f}** |",
              f"| fine fusion + matching, every inner cell matched (bound) | - | "
              f"{1000 * np.median(dense):.0f} / {1000 * min(dense):.0f} |",
              f"| **total, every inner cell matched (bound)** | - | **{bound_median:.0f} / {bound_best:.0f}** |", "",
              f"Throughput ratio (reference time / kp_ros time): **{ref_median / ours_median:.2f}x** "
              f"median, {ref_best / ours_best:.2f}x best (median {matches:.0f} matches per step); "
              f"with every inner cell matched: **{ref_median / bound_median:.2f}x** median, "
              f"{ref_best / bound_best:.2f}x best.", "",
              "| pair | coarse confidence | mutual-NN pairs + scores (count) | reference rows that are "
              "consistent pairs | matches kp_ros / reference |", "|---|---|---|---|---|", *agree, "",
              "| backbone, one 640x480 frame | median (ms) | best (ms) | max rel. diff vs no_grad |",
              "|---|---|---|---|", *options, ""]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eloftr.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
