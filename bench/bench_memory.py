"""Memory of the node processes over a 1000-frame stream: peak RSS and its trend.

    python bench/bench_memory.py [--size tiny|full] [--device auto] [--frames 1000] [--rate HZ] [--out DIR]

Both nodes run as the launch file runs them (two processes on one image topic); this
process publishes ``--frames`` 640x480 frames at ``--rate`` and samples each node's
VmRSS / VmHWM from /proc every ``--interval`` s. The rate is above what full-size models
process on a CPU, on purpose: dropped frames still pass through the keep-latest slot,
which is what could leak; how many frames were processed is reported with the result.
Trend = least-squares RSS slope from the node's 3rd processed frame (after warm-up: model
init, allocator pools) to the end of the stream, and the RSS growth over that window.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_live import (DIAGNOSTICS_PERIOD, NODES, REPO, StreamClient, image_messages,  # noqa: E402
                        load_frames, model_dirs, read_memory_mb, resolve_device_name, setup_env,
                        start_node, stop_node)


class Sampler(threading.Thread):
    """RSS of each process, every ``interval`` s, until stopped."""

    def __init__(self, pids: dict[str, int], interval: float, t0: float):
        super().__init__(daemon=True)
        self.pids, self.interval, self.t0 = pids, interval, t0
        self.samples: dict[str, list[tuple[float, float]]] = {key: [] for key in pids}
        self.peak: dict[str, float] = {key: 0.0 for key in pids}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        now = time.monotonic() - self.t0
        for key, pid in self.pids.items():
            try:
                rss, hwm = read_memory_mb(pid)
            except OSError:
                continue
            self.samples[key].append((now, rss))
            self.peak[key] = max(self.peak[key], hwm)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.sample()


def trend(samples: list[tuple[float, float]], start: float | None, end: float) -> dict:
    """RSS growth over [start, end]: the baseline (lowest RSS) of the last third minus that
    of the first third - a model's per-frame buffers come and go, a leak raises the floor -
    and the least-squares slope (MiB/min) when the window is long enough (>= 20 s) for one."""
    points = [(t, r) for t, r in samples if start is not None and start <= t <= end]
    if len(points) < 6 or points[-1][0] - points[0][0] < 3.0:
        return {"growth_mb": None, "slope_mb_per_min": None, "window_s": None}
    t, r = np.asarray(points).T
    third = len(r) // 3
    window = float(t[-1] - t[0])
    slope = float(np.polyfit(t, r, 1)[0] * 60.0) if window >= 20.0 else None
    return {"growth_mb": float(r[-third:].min() - r[:third].min()), "slope_mb_per_min": slope,
            "window_s": window}


def warm_time(history: list[tuple[float, dict]], t0: float, processed: int) -> float | None:
    """Seconds after t0 when the node's counters first showed ``processed`` frames done."""
    return next((t - t0 for t, c in history if c["processed"] >= processed), None)


def run(size: str, device: str, frames_count: int, rate: float, interval: float, out_dir: Path,
        log) -> dict:
    from kp_ros import msg as kp_msgs
    dirs = model_dirs(size, out_dir)
    frames, source = load_frames()
    messages = image_messages(frames)
    image_topic = "/kp_ros_bench/memory/image"
    outputs = {key: (NODES[key][1], getattr(kp_msgs, NODES[key][2]), NODES[key][3]) for key in NODES}
    client = StreamClient(image_topic, outputs)
    logs = {key: out_dir / "logs" / f"memory_{NODES[key][0]}.log" for key in NODES}
    params = {key: {"diagnostics_period": DIAGNOSTICS_PERIOD} for key in NODES}
    processes = {key: start_node(key, dirs[key], device, image_topic, logs[key], params[key]) for key in NODES}
    t0 = time.monotonic()
    sampler = Sampler({key: p.pid for key, p in processes.items()}, interval, t0)
    sampler.start()
    result = {"meta": {"size": size, "device": device, "frames": source, "rate_hz": rate,
                       "interval_s": interval}, "nodes": {}}
    try:
        for key, process in processes.items():
            fqn = f"/{NODES[key][0]}"
            problem = client.wait_ready(fqn, list(NODES), timeout=240.0, process=process)
            if problem:
                raise RuntimeError(f"{NODES[key][0]} did not come up ({problem}); see {logs[key]}")
        loaded = {key: read_memory_mb(p.pid)[0] for key, p in processes.items()}
        log(f"memory: nodes up after {time.monotonic() - t0:.0f} s, RSS "
            + ", ".join(f"{NODES[k][0]} {v:.0f} MiB" for k, v in loaded.items())
            + f"; publishing {frames_count} frames at {rate:g} Hz")
        before = {key: client.settled_counters(f"/{NODES[key][0]}", time.monotonic(), 10.0)[0] for key in NODES}
        first = len(client.published)
        published, start, end = client.stream(messages, rate, 1e9,
                                              stop=lambda: len(client.published) - first >= frames_count)
        settled = {key: client.settled_counters(f"/{NODES[key][0]}", end, 120.0) for key in NODES}
        stream = (start - t0, end - t0)
    finally:
        sampler.stop()
        stopped = {key: stop_node(p, logs[key]) for key, p in processes.items()}
        client.close()
    for key in NODES:
        samples = sampler.samples[key]
        counts, ok = settled[key]
        counts = {k: counts.get(k, 0) - before[key].get(k, 0) for k in ("received", "processed", "dropped", "rejected")}
        history = client.diagnostics.get(f"/{NODES[key][0]}", [])
        warm = warm_time(history, t0, before[key].get("processed", 0) + 3)
        result["nodes"][key] = {
            "node": NODES[key][0], "published": published, **counts, "settled": ok,
            "outputs": len(client.arrivals[key]),
            "rss_loaded_mb": loaded[key], "rss_end_mb": samples[-1][1] if samples else None,
            "rss_peak_mb": sampler.peak[key],
            **trend(samples, warm, stream[1]), "warm_s": warm,
            "processed_series": [(t - t0, c["processed"]) for t, c in history],
            "exit_code": stopped[key][0], "shutdown_counters": stopped[key][1],
            "series": samples,
        }
    result["meta"]["stream_s"] = stream
    return result


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"### Node memory over a {meta['rate_hz']:g} Hz stream ({meta['size']} random-init, "
             f"{meta['device']}, {meta['frames']}, both nodes running, RSS sampled every "
             f"{meta['interval_s']:g} s)", "",
             "| node | frames published | received | processed | dropped | RSS loaded MiB | RSS end MiB "
             "| peak RSS (VmHWM) MiB | after warm-up: baseline growth MiB over s | slope MiB/min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in result["nodes"].values():
        growth = "window too short" if res["growth_mb"] is None else \
            f"{res['growth_mb']:+.1f} over {res['window_s']:.0f}"
        slope = "-" if res["slope_mb_per_min"] is None else f"{res['slope_mb_per_min']:+.2f}"
        lines.append(f"| {res['node']} | {res['published']} | {res['received']} | {res['processed']} | "
                     f"{res['dropped']} | {res['rss_loaded_mb']:.0f} | {res['rss_end_mb']:.0f} | "
                     f"{res['rss_peak_mb']:.0f} | {growth} | {slope}"
                     f"{'' if res['settled'] else ' (counters unsettled)'} |")
    lines += ["", "Warm-up = until the node's 3rd processed frame (model init, allocator pools). Baseline "
              "growth = lowest RSS in the last third of the window minus lowest in the first third "
              "(per-frame buffers come and go; a leak raises the floor); slope only for windows >= 20 s. "
              "Frames the model could not keep up with were dropped by the keep-latest slot "
              "(they still went through DDS and the subscription), so processed < published is expected "
              "on a slow device."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=None, help="Hz (default: 10 full-size, 60 tiny)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--domain-id", type=int, default=98)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    setup_env(args.domain_id)
    args.out.mkdir(parents=True, exist_ok=True)
    rate = args.rate or (10.0 if args.size == "full" else 60.0)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    device = resolve_device_name(args.device)
    result = run(args.size, device, args.frames, rate, args.interval, args.out, log)
    (args.out / "memory.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (args.out / "memory.md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
