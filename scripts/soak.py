#!/usr/bin/env python3
"""Soak run: 10,000 frames through both nodes; nothing lost, no memory growth.

    python scripts/soak.py [--frames 10000] [--size tiny|full] [--rate 50] [--bad-every 100]
                           [--width 640 --height 480] [--device auto] [--out DIR]

Not part of the test suite (minutes). Both nodes run as the launch file runs them, each
in its own process on one image topic (reliable input, so every published frame must
arrive). This process publishes ``--frames`` frames at ``--rate`` Hz, faster than the
models run on purpose: most frames are then dropped by the keep-latest hand-off, the path
that could leak. Every ``--bad-every``-th frame is malformed (unknown encoding, truncated
data, zero size, float pixels) and must be rejected, not kill anything.

Checks, per node, at the end (exit code 1 if one fails):
  - accounting: received == published and received == processed + dropped + rejected,
    from the node's own shutdown line (and its last /diagnostics before the stop);
  - clean exit (code 0, no traceback);
  - memory: VmRSS from /proc/PID/status every ``--interval`` s. Reported: the slope of a
    least-squares line of RSS against frames published over the second half of the stream
    (after warm-up), in MB per 1000 frames, with its standard error; and the same fit over
    the RSS floor (the minimum of each tenth of that half), which ignores samples taken
    mid-inference. The floor slope must stay below ``--max-slope``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's kp_ros, not a copy installed in the venv
    sys.path.insert(0, str(REPO))
from kp_ros.testing import node_process  # noqa: E402

PARAMS_FILE = REPO / "config" / "matcher.yaml"
NODES = {  # key -> (executable, output topic)
    "superpoint": ("superpoint_node", "keypoints"),
    "eloftr": ("eloftr_node", "matches"),
}
COUNTERS = ("received", "processed", "dropped", "rejected")


def setup_env() -> None:
    """DDS as the launch file sets it up, on a domain of this run's own, before rclpy loads:
    this process and the nodes share one environment (node_process.node_env)."""
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    os.environ.update(node_process.node_env(source_root=REPO))


def model_dirs(args, root: Path) -> dict[str, str]:
    if args.superpoint_model and args.eloftr_model:
        return {"superpoint": args.superpoint_model, "eloftr": args.eloftr_model}
    from kp_ros.core.random_init import save_random_eloftr, save_random_superpoint
    return {"superpoint": args.superpoint_model or str(save_random_superpoint(root / "superpoint", args.size)),
            "eloftr": args.eloftr_model or str(save_random_eloftr(root / "eloftr", args.size))}


def start_node(key: str, model: str, device: str, log_path: Path) -> node_process.NodeProcess:
    return node_process.start_node(
        NODES[key][0], log_path, params={"model": model, "device": device, "reliable_input": True,
                                         "diagnostics_period": 0.5},
        params_file=PARAMS_FILE, remaps={"image": "/soak/image"}, cwd=REPO)


def stop_node(process: node_process.NodeProcess) -> tuple[int, dict, str]:
    code, text = process.stop(120)
    return code, node_process.parse_counters(text) or {}, text


def frames(height: int, width: int, count: int = 20) -> list[np.ndarray]:
    """Smooth random texture sliding a few pixels per frame (motion for the matcher)."""
    import cv2
    base = cv2.resize(np.random.default_rng(0).integers(0, 256, (height // 4, width // 4 + 2 * count, 3), np.uint8),
                      (width + 8 * count, height), interpolation=cv2.INTER_CUBIC)
    return [np.ascontiguousarray(base[:, 4 * i:4 * i + width]) for i in range(count)]


def bad_messages() -> list:
    from sensor_msgs.msg import Image
    return [Image(height=8, width=8, encoding="yuv422", step=16, data=bytes(128)),
            Image(height=480, width=640, encoding="rgb8", step=1920, data=bytes(1000)),
            Image(height=0, width=0, encoding="mono8", step=0, data=b""),
            Image(height=4, width=4, encoding="32FC1", step=16, data=bytes(64))]


class Driver:
    """Publishes frames; a background thread spins for /diagnostics and output counts."""

    def __init__(self):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from kp_ros.msg import Keypoints, Matches
        from kp_ros.ros.qos import output_qos

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("kp_ros_soak", context=self.context)
        self.pub = self.node.create_publisher(Image, "/soak/image", QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE))
        self.diagnostics: dict[str, dict] = {}
        self.outputs = {"superpoint": 0, "eloftr": 0}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)
        for key, msg_type in (("superpoint", Keypoints), ("eloftr", Matches)):
            self.node.create_subscription(msg_type, f"/{NODES[key][1]}", self._counter(key), output_qos())
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.running = True
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        while self.running and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def _counter(self, key):
        def callback(_msg):
            self.outputs[key] += 1
        return callback

    def _on_diagnostics(self, msg):
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if "received" in values:
                self.diagnostics[status.name.split(":")[0]] = {k: int(values[k]) for k in COUNTERS}

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.1)
        return predicate()

    def close(self):
        import rclpy
        self.running = False
        self.thread.join(5)
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


class Sampler(threading.Thread):
    """(seconds, frames published so far, VmRSS MiB per node, streaming?) every ``interval`` s."""

    def __init__(self, pids: dict[str, int], interval: float, published):
        super().__init__(daemon=True)
        self.pids, self.interval, self.published = pids, interval, published
        self.samples: list[tuple[float, int, dict[str, float], bool]] = []
        self.streaming = True
        self.peak = {key: 0.0 for key in pids}
        self.t0 = time.monotonic()
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(self.interval):
            self.sample()

    def sample(self):
        rss = {}
        for key, pid in self.pids.items():
            try:
                rss[key], peak = node_process.memory_mb(pid)
                self.peak[key] = max(self.peak[key], peak)
            except OSError:
                rss[key] = float("nan")
        self.samples.append((time.monotonic() - self.t0, self.published(), rss, self.streaming))


def slope_mb_per_1000(samples, key: str, total: int, windows: int = 10) -> dict:
    """RSS trend against frames published, over the samples taken while the second half of
    the stream was published, in MB per 1000 frames:
      'slope' +- 'stderr': least squares over every sample;
      'floor_slope': least squares over the minimum of each of ``windows`` equal stretches.
    A sample can land inside an inference (transient buffers, hundreds of MB for the
    matcher's attention), which makes the first noisy; a leak raises the floor too."""
    points = [(n, rss[key]) for _, n, rss, streaming in samples
              if streaming and n >= total / 2 and np.isfinite(rss[key])]
    result = {"slope": float("nan"), "stderr": float("nan"), "floor_slope": float("nan"), "points": len(points)}
    if len(points) < 3 or np.ptp([n for n, _ in points]) == 0:
        return result
    n, rss = np.array(points, float).T
    x = n / 1000.0
    slope, intercept = np.polyfit(x, rss, 1)
    residuals = rss - (slope * x + intercept)
    result["slope"] = float(slope)
    result["stderr"] = float(np.sqrt(residuals.var(ddof=2) / ((x - x.mean()) ** 2).sum()))
    edges = np.linspace(x.min(), x.max() + 1e-9, windows + 1)
    floor = [(x[m][np.argmin(rss[m])], rss[m].min())
             for m in ((x >= lo) & (x < hi) for lo, hi in zip(edges[:-1], edges[1:])) if m.any()]
    if len(floor) >= 3:
        fx, fy = np.array(floor).T
        result["floor_slope"] = float(np.polyfit(fx, fy, 1)[0])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=10000)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny", help="random-init model size")
    parser.add_argument("--superpoint-model", help="use these weights instead of random ones")
    parser.add_argument("--eloftr-model", help="use these weights instead of random ones")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rate", type=float, default=50.0, help="publish rate, Hz")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--bad-every", type=int, default=100, help="every N-th frame malformed; 0: none")
    parser.add_argument("--interval", type=float, default=0.5, help="RSS sampling period, s")
    parser.add_argument("--max-slope", type=float, default=1.0, help="MB per 1000 frames that fails the run")
    parser.add_argument("--out", type=Path, help="directory for soak.json and the node logs")
    args = parser.parse_args(argv)
    setup_env()
    out = args.out or Path(tempfile.mkdtemp(prefix="kp_ros_soak_"))
    out.mkdir(parents=True, exist_ok=True)

    from kp_ros.ros.conversions import array_to_image_msg
    models = model_dirs(args, out / "models")
    logs = {key: out / f"{NODES[key][0]}.log" for key in NODES}
    processes = {key: start_node(key, models[key], args.device, logs[key]) for key in NODES}
    fqn = {key: f"/{NODES[key][0]}" for key in NODES}
    driver = Driver()
    good = [array_to_image_msg(frame, "rgb8") for frame in frames(args.height, args.width)]
    bad = bad_messages()
    published = bad_sent = 0
    try:
        ready = driver.wait(lambda: driver.pub.get_subscription_count() >= 2
                            and all(name in driver.diagnostics for name in fqn.values()), 180)
        if not ready:
            for key, process in processes.items():
                print(f"{key} did not come up (exit {process.poll()}):\n{logs[key].read_text()[-2000:]}")
            return 1
        sampler = Sampler({key: p.pid for key, p in processes.items()}, args.interval, lambda: published)
        sampler.sample()
        sampler.start()
        start = next_at = time.monotonic()
        for i in range(args.frames):
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            next_at = max(next_at + 1.0 / args.rate, time.monotonic() - 0.5 / args.rate)
            if args.bad_every and i % args.bad_every == args.bad_every - 1:
                msg = bad[bad_sent % len(bad)]
                bad_sent += 1
            else:
                msg = good[i % len(good)]
            stamp = time.time_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = stamp // 10**9, stamp % 10**9
            msg.header.frame_id = "camera"
            driver.pub.publish(msg)
            published += 1
            if published % 1000 == 0:
                print(f"  {published} frames, {time.monotonic() - start:.0f} s, counters "
                      f"{ {k: driver.diagnostics.get(fqn[k]) for k in NODES} }", flush=True)
        stream_s = time.monotonic() - start
        sampler.sample()
        sampler.streaming = False

        history = []

        def settled():
            """Nothing in progress and nothing still arriving (received unchanged for 2 s)."""
            counts = {k: driver.diagnostics.get(fqn[k], {}) for k in NODES}
            history.append((time.monotonic(), {k: c.get("received") for k, c in counts.items()}))
            recent = [r for t, r in history if t > history[-1][0] - 2.0]
            return history[-1][0] - history[0][0] > 2.0 and all(r == recent[-1] for r in recent) and all(
                c and c["received"] == c["processed"] + c["dropped"] + c["rejected"] for c in counts.values())
        driver.wait(settled, 600)
        sampler.done.set()
        sampler.join()
        last_diag = {k: driver.diagnostics.get(fqn[k]) for k in NODES}
        outputs = dict(driver.outputs)
    finally:
        driver.close()
        results = {key: stop_node(process) for key, process in processes.items()}

    report = {"frames": args.frames, "published": published, "bad_published": bad_sent,
              "rate_hz": args.rate, "achieved_rate_hz": published / stream_s, "stream_s": stream_s,
              "size": args.size, "image": f"{args.width}x{args.height}", "nodes": {}}
    ok = True
    for key in NODES:
        code, counts, text = results[key]
        trend = slope_mb_per_1000(sampler.samples, key, published)
        first = sampler.samples[0][2][key]
        half = next((rss[key] for _, n, rss, _ in sampler.samples if n >= published / 2), float("nan"))
        resets = re.findall(r"stream resets: (\d+)", text)
        checks = {
            "received == published": counts.get("received") == published,
            "received == processed + dropped + rejected": bool(counts) and counts["received"] == sum(
                counts[k] for k in COUNTERS[1:]),
            "clean exit": code == 0 and "Traceback" not in text,
            f"RSS floor slope < {args.max_slope} MB/1000 frames": bool(trend["floor_slope"] < args.max_slope),
        }
        ok &= all(checks.values())
        report["nodes"][key] = {"counters": counts, "last_diagnostics": last_diag[key], "outputs_seen": outputs[key],
                                "exit_code": code, "rss_start_mb": first, "rss_half_mb": half,
                                "rss_end_mb": sampler.samples[-1][2][key], "peak_mb": sampler.peak[key],
                                "slope_mb_per_1000_frames": trend["slope"], "slope_stderr": trend["stderr"],
                                "floor_slope_mb_per_1000_frames": trend["floor_slope"],
                                "slope_points": trend["points"],
                                "lost_in_transport": published - counts.get("received", 0),
                                "stream_resets": int(resets[-1]) if resets else None, "checks": checks}
    report["ok"] = ok
    (out / "soak.json").write_text(json.dumps({**report, "samples": sampler.samples}, indent=1))

    print(f"\nsoak: {published} frames ({bad_sent} malformed) at {report['achieved_rate_hz']:.0f} Hz "
          f"in {stream_s:.0f} s, {args.width}x{args.height}, {args.size} models; logs in {out}")
    print(f"{'node':<11} {'received':>8} {'processed':>9} {'dropped':>8} {'rejected':>8} {'outputs':>8} "
          f"{'RSS start':>9} {'half':>7} {'end':>7} {'peak':>7} {'slope MB/1k frames':>18} {'floor slope':>11}")
    for key, node in report["nodes"].items():
        c = node["counters"]
        print(f"{key:<11} {c.get('received', '-'):>8} {c.get('processed', '-'):>9} {c.get('dropped', '-'):>8} "
              f"{c.get('rejected', '-'):>8} {node['outputs_seen']:>8} {node['rss_start_mb']:>9.1f} "
              f"{node['rss_half_mb']:>7.1f} {node['rss_end_mb']:>7.1f} {node['peak_mb']:>7.1f} "
              f"{node['slope_mb_per_1000_frames']:>10.3f} +- {node['slope_stderr']:.3f} "
              f"{node['floor_slope_mb_per_1000_frames']:>11.3f}")
        if node["stream_resets"] is not None:
            print(f"    stream resets (no Matches for that frame): {node['stream_resets']}")
        for check, passed in node["checks"].items():
            print(f"    {'ok  ' if passed else 'FAIL'} {check}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
