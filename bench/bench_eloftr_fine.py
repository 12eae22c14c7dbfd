"""EfficientLoFTR's fine stage: the pyramid on the whole maps vs on tiles of matched cells.

    python bench/bench_eloftr_fine.py [--sizes 640x480,1920x1080] [--precisions fp32,bf16]
        [--shares 0.001,0.01,0.05,0.2,0.5,1] [--tile-cells 4] [--runs 2] [--max-work 2]

Times (the least of --runs after a warm-up) and peak memory of ``fine_windows`` (the fine
pyramid + the windows of every match) on the full-size random-init model, for a share of
the coarse cells matched, laid out
``scattered`` (random cells in each frame) or ``clustered`` (one block of cells): the
whole maps (``fine_tile_cells=0``) against the tiles (forced, whatever the cost rule
says), with the convolution work of the tiles over the maps' (``work``) and what the
default rule picks (``rule``), so that the cross-over in time can be read against the
work ratio the rule uses (TILE_WORK_RATIO in kp_ros/core/eloftr.py). Tiles more than
--max-work times the maps' work are not timed.

Each precision and measure runs in its own subprocess: times with
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967295
(freed large tensors are not unmapped, so no page faults distort the times); memory with
a fixed 64 KiB mmap threshold (every large tensor mapped and unmapped, so the resident
set follows the live tensors) as the rise of VmHWM over the resident set before the call
(VmHWM reset through /proc/self/clear_refs). The frames' backbone features (one
synthetic frame per size, used for both frames) are computed once and not counted.
One thread by default (--threads): both paths on one core. Timings on a shared machine
are noisy: compare rows of one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "test")]

TIMING_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967295"
MEMORY_TUNABLES = "glibc.malloc.mmap_threshold=65536"


def matches_for(layout: str, share: float, grid: tuple[int, int], seed: int = 0):
    from kp_ros.core.eloftr import CoarseMatches
    height, width = grid
    cells = height * width
    count = max(1, int(round(share * cells)))
    generator = torch.Generator().manual_seed(seed)
    if layout == "scattered":
        i_ids = torch.randperm(cells, generator=generator)[:count]
        j_ids = torch.randperm(cells, generator=generator)[:count]
    else:  # one block of the image's aspect, centred; the newer frame's one cell to the right
        rows = min(height, int(np.ceil(np.sqrt(count * height / width))))
        cols = min(width, int(np.ceil(count / rows)))
        top, left = (height - rows) // 2, (width - cols) // 2
        y, x = np.divmod(np.arange(count), cols)
        i_ids = torch.from_numpy((top + y) * width + left + x)
        j_ids = torch.from_numpy((top + y) * width + np.minimum(left + x + 1, width - 1))
        j_ids = torch.unique(j_ids)[:count]
        i_ids = i_ids[:len(j_ids)]
    return CoarseMatches(i_ids.long(), j_ids.long(), torch.ones(len(i_ids)))


def peak_rise(call) -> float:
    """MB the resident set rose above its level before ``call`` at its peak."""
    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        raise RuntimeError(field)
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    call()
    return status("VmHWM:") - before


def worker(args) -> None:
    """One precision, one measure ('time' or 'memory'): JSON lines on stdout."""
    import kp_ros.core.eloftr as eloftr
    from conftest import synthetic_frame
    from kp_ros.core.eloftr import EfficientLoFTRStreamMatcher
    from kp_ros.core.eloftr_fine_tiles import full_map_macs
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    matcher = EfficientLoFTRStreamMatcher(args.model, device="cpu", resize="native", precision=args.precision)
    default_tiles, default_ratio = matcher.fine_tile_cells, eloftr.TILE_WORK_RATIO
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        with torch.inference_mode():
            features = matcher.extract(matcher.preprocess(synthetic_frame(height, width, seed=0)))
        grid = tuple(features.coarse.shape[-2:])
        full = 2 * full_map_macs(matcher._fine_fusion, *grid)

        def measure(matches, tiles: int) -> float:
            matcher.fine_tile_cells = tiles
            eloftr.TILE_WORK_RATIO = 0.0  # tiles whenever on

            def call():
                with torch.inference_mode():
                    return matcher.fine_windows(features.coarse, features.coarse, features, features, matches)
            try:
                if args.measure == "memory":
                    call()
                    return peak_rise(call)
                times = []
                for _ in range(args.runs + 1):
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
                return 1000 * min(times[1:])  # the least disturbed run (a shared machine)
            finally:
                matcher.fine_tile_cells, eloftr.TILE_WORK_RATIO = default_tiles, default_ratio

        # The whole maps' cost hardly depends on the matches (cutting windows is cheap), and
        # the windows of every cell would add GBs at 1920x1080: timed with a few.
        few = matches_for("scattered", 0.001, grid)

        def maps():  # again before each layout: the least of all, as the machine's load varies
            print(json.dumps({"size": size, "precision": args.precision, "measure": args.measure,
                              "path": "maps", "value": measure(few, 0)}), flush=True)
        for layout in ("scattered", "clustered"):
            maps()
            for share in (float(s) for s in args.shares.split(",")):
                matches = matches_for(layout, share, grid)
                with torch.inference_mode():
                    rule = matcher.fine_tile_plan(features, matches)
                for tiles in (int(t) for t in args.tile_cells.split(",")):
                    matcher.fine_tile_cells, eloftr.TILE_WORK_RATIO = tiles, 0.0
                    with torch.inference_mode():
                        plan = matcher.fine_tile_plan(features, matches)
                    matcher.fine_tile_cells, eloftr.TILE_WORK_RATIO = default_tiles, default_ratio
                    work = plan.macs() / full
                    value = measure(matches, tiles) if work <= args.max_work else None
                    print(json.dumps({"size": size, "precision": args.precision, "measure": args.measure,
                                      "path": "tiles", "layout": layout, "share": share, "tile_cells": tiles,
                                      "matches": len(matches.i_ids), "tiles": plan.tile_count, "work": work,
                                      "rule": "maps" if rule is None else f"tiles({default_tiles})",
                                      "value": value}), flush=True)


def table(rows: list[dict]) -> str:
    maps = {}
    for r in rows:
        if r["path"] == "maps":
            key = (r["size"], r["precision"], r["measure"])
            maps[key] = min(maps.get(key, r["value"]), r["value"])
    merged = {}
    for r in rows:
        if r["path"] == "tiles":
            key = (r["size"], r["precision"], r["layout"], r["share"], r["tile_cells"])
            merged.setdefault(key, dict(r))[r["measure"]] = r["value"]
    lines = ["| size | prec | layout | share | matches | T | tiles | work | maps ms | tiles ms | speed-up "
             "| maps MB | tiles MB | rule |", "|" + "---|" * 14]
    for (size, precision, layout, share, tiles), r in merged.items():
        t_maps, t_tiles = maps.get((size, precision, "time")), r.get("time")
        m_maps, m_tiles = maps.get((size, precision, "memory")), r.get("memory")

        def fmt(value, spec=".0f"):
            return "-" if value is None else format(value, spec)
        speed = None if t_maps is None or t_tiles is None else t_maps / t_tiles
        lines.append(f"| {size} | {precision} | {layout} | {100 * share:g} % | {r['matches']} | {tiles} "
                     f"| {r['tiles']} | {r['work']:.3f} | {fmt(t_maps)} | {fmt(t_tiles)} | {fmt(speed, '.2f')} "
                     f"| {fmt(m_maps)} | {fmt(m_tiles)} | {r['rule']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="640x480,1920x1080", help="WxH, comma-separated")
    parser.add_argument("--precisions", default=None, help="default fp32, and bf16 where the CPU has avx512_bf16")
    parser.add_argument("--shares", default="0.001,0.01,0.05,0.2,0.5,1")
    parser.add_argument("--tile-cells", default="4", help="tile sizes T to time, comma-separated")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per point (after one warm-up)")
    parser.add_argument("--max-work", type=float, default=2.0, help="skip tiles over this x the maps' work")
    parser.add_argument("--measures", default="time,memory")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default). On a shared machine more than one thread "
                             "makes every op wait for a descheduled worker, which penalises many small ops")
    parser.add_argument("--model", default=None, help="model dir (default: a random-init full-size one)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        worker(args)
        return
    if args.precisions is None:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        args.precisions = "fp32,bf16" if "avx512_bf16" in flags else "fp32"
    with tempfile.TemporaryDirectory() as scratch:
        if args.model is None:
            from kp_ros.core.random_init import save_random_eloftr
            args.model = str(save_random_eloftr(Path(scratch) / "eloftr_full", "full", seed=0))
        rows = []
        for precision in args.precisions.split(","):
            for measure in args.measures.split(","):
                env = dict(os.environ, GLIBC_TUNABLES=TIMING_TUNABLES if measure == "time" else MEMORY_TUNABLES)
                command = [sys.executable, __file__, "--measure", measure, "--precision", precision,
                           "--model", args.model, "--sizes", args.sizes, "--shares", args.shares,
                           "--tile-cells", args.tile_cells, "--runs", str(args.runs),
                           "--max-work", str(args.max_work), "--threads", str(args.threads)]
                result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
                if result.returncode:
                    print(f"worker {precision} {measure} failed ({result.returncode})", file=sys.stderr)
                rows += [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
                print(f"{precision} {measure}: {len(rows)} rows", file=sys.stderr, flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
