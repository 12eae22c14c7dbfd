"""Live-stream limits: frames published over DDS at increasing rates to the running nodes.

    python bench/bench_live.py [--size tiny|full] [--device auto] [--nodes superpoint,eloftr]
                               [--factors 0.5,1,2,4] [--duration S] [--out DIR]

As ros2_benchmark does: each node runs as its own process (``python -m kp_ros.nodes.X``
with config/matcher.yaml, as the launch file starts it); this process publishes 640x480
rgb8 frames (TUM fr3 if present, else synthetic) with reliable QoS, as most camera
drivers offer it (the node's reliable_input: auto then subscribes reliable; best effort
over the default transports loses many full frames in transport: bench_interop.py), and
subscribes to the node's output. Per input rate: processed rate, drops (the
node's own counters from /diagnostics, plus frames lost in transport), and latency from
``publish()`` to the output's arrival here (same clock, same process).

Rates are relative to the node's measured processing rate (a short calibration at
saturation first), plus 30 Hz (a camera) when that is faster, so the same command means
the same thing on a CPU and on a GPU. Above the model's rate the keep-latest hand-off
drops frames instead of queueing them: latency stays bounded by about two processing
times, which the table shows.

Also the home of what the other bench scripts share: frames, random-init model
directories, the DDS environment, starting/stopping node processes (through
kp_ros/testing/node_process.py, as the tests, the soak run and kp_demo do).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's kp_ros, not a copy installed in the venv
    sys.path.insert(0, str(REPO))
from kp_ros.testing import node_process  # noqa: E402
from kp_ros.testing.node_process import memory_mb as read_memory_mb  # noqa: E402,F401 (bench_memory's)

TUM_DIR = REPO.parent / "shared" / "data" / "tum_fr3_long_office_household"
PARAMS_FILE = REPO / "config" / "matcher.yaml"
CAMERA_RATE = 30.0
MAX_PUBLISH_RATE = 120.0  # what one Python publisher sustains for 640x480 rgb8 without starving the node
DROP_LIMIT_PCT = 5.0
DIAGNOSTICS_PERIOD = 0.5  # s; the counters are read from /diagnostics at every rate change

# node key -> (executable, output topic, output message type name, field that counts items)
NODES = {
    "superpoint": ("superpoint_node", "keypoints", "Keypoints", "x"),
    "eloftr": ("eloftr_node", "matches", "Matches", "x0"),
}


# --- shared by the bench scripts ------------------------------------------------------

def setup_env(domain_id: int) -> None:
    """DDS settings as the launch file uses them, on a domain of our own, before rclpy
    starts: this process gets the nodes' environment (node_process.node_env)."""
    os.environ.update(node_process.node_env(source_root=REPO, domain_id=domain_id))


def load_frames(count: int = 17) -> tuple[list[np.ndarray], str]:
    """640x480 RGB uint8 frames: TUM fr3 long office household if present, else synthetic
    (smooth random texture, shifted a few pixels per frame so ELoFTR has motion to match)."""
    paths = sorted(TUM_DIR.glob("*.png"))[:count] if TUM_DIR.is_dir() else []
    if paths:
        from PIL import Image
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths], f"TUM fr3 640x480 ({len(paths)} frames)"
    import cv2
    base = cv2.resize(np.random.default_rng(0).integers(0, 256, (120, 170, 3), dtype=np.uint8),
                      (680, 480), interpolation=cv2.INTER_CUBIC)
    frames = [np.ascontiguousarray(base[:, 2 * i:2 * i + 640]) for i in range(min(count, 20))]
    return frames, f"synthetic 640x480 ({len(frames)} frames; TUM not found at {TUM_DIR})"


def model_dirs(size: str, root: Path) -> dict[str, Path]:
    """Random-init SuperPoint / EfficientLoFTR checkpoints (real architecture for 'full'),
    saved once under ``root/models/<size>`` and reused by every bench script."""
    from kp_ros.core.random_init import save_random_eloftr, save_random_superpoint
    dirs = {"superpoint": root / "models" / size / "superpoint", "eloftr": root / "models" / size / "eloftr"}
    for key, save in (("superpoint", save_random_superpoint), ("eloftr", save_random_eloftr)):
        if not (dirs[key] / "config.json").exists():
            save(dirs[key], size, seed=0)
    return dirs


def resolve_device_name(name: str) -> str:
    from kp_ros.core.model_loading import resolve_device
    return str(resolve_device(name))


def start_node(key: str, model_dir: Path, device: str, image_topic: str, log_path: Path,
               params: dict | None = None, threads: int | None = None) -> node_process.NodeProcess:
    """The node as the launch file runs it: its own process, params file, then overrides;
    ``threads`` caps its torch (OpenMP) threads."""
    return node_process.start_node(
        NODES[key][0], log_path, params={"model": model_dir, "device": device, **(params or {})},
        params_file=PARAMS_FILE, remaps={"image": image_topic},
        env=node_process.node_env(source_root=REPO, threads=threads), cwd=REPO)


def stop_node(process: node_process.NodeProcess, log_path: Path | None = None,
              timeout: float = 60.0) -> tuple[int, dict]:
    """SIGINT as ros2 launch does; the exit code and the counters of its shutdown line.
    (``log_path`` is the process's own log, which it knows.)"""
    code, log = process.stop(timeout)
    return code, node_process.parse_counters(log) or {}


def percentiles_ms(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0, "median": None, "p95": None, "max": None}
    ms = 1e3 * np.asarray(seconds)
    return {"n": len(ms), "median": float(np.median(ms)), "p95": float(np.percentile(ms, 95)),
            "max": float(ms.max())}


class StreamClient:
    """This side of the stream: publishes frames, records each output's arrival by the
    stamp of the frame it came from, and keeps the node's latest /diagnostics counters.
    A background thread spins, so arrivals are timed while the main thread publishes."""

    def __init__(self, image_topic: str, outputs: dict[str, tuple[str, type, str]]):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import Image

        from kp_ros.ros.qos import output_qos

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("kp_ros_bench_client", context=self.context)
        self.image_pub = self.node.create_publisher(Image, image_topic, output_qos())
        self.published: dict[tuple[int, int], float] = {}  # stamp -> monotonic publish time
        self.arrivals: dict[str, list[tuple[tuple[int, int], float, int]]] = {}
        self.diagnostics: dict[str, list[tuple[float, dict]]] = {}
        self.output_topics = {}
        for key, (topic, msg_type, count_field) in outputs.items():
            self.arrivals[key] = []
            self.output_topics[key] = topic
            self.node.create_subscription(msg_type, topic, self._on_output(key, count_field), output_qos())
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._running = True
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while self._running and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def _on_output(self, key: str, count_field: str):
        arrivals = self.arrivals[key]

        def callback(msg) -> None:
            now = time.monotonic()
            arrivals.append(((msg.header.stamp.sec, msg.header.stamp.nanosec), now, len(getattr(msg, count_field))))
        return callback

    def _on_diagnostics(self, msg) -> None:
        now = time.monotonic()
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if "processed" not in values:
                continue
            counts = {k: int(values[k]) for k in ("received", "processed", "dropped", "rejected")}
            self.diagnostics.setdefault(status.name.split(":")[0], []).append((now, counts))

    def close(self) -> None:
        import rclpy
        self._running = False
        self._thread.join(5)
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)

    # --- publishing -----------------------------------------------------------------
    def publish(self, msg) -> None:
        stamp = time.time_ns()  # a camera driver's stamp; unique per frame
        msg.header.stamp.sec, msg.header.stamp.nanosec = stamp // 10**9, stamp % 10**9
        self.published[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = time.monotonic()
        self.image_pub.publish(msg)

    def stream(self, messages: list, rate: float, duration: float, stop=None) -> tuple[int, float, float]:
        """Publish at ``rate`` Hz for ``duration`` s (or until ``stop()``); never bursts to
        catch up. Returns (frames published, start, end) in monotonic seconds."""
        start = next_at = time.monotonic()
        count = 0
        while True:
            if stop is not None and stop():
                break
            if next_at - start >= duration:  # the last frame's interval belongs to the window
                time.sleep(max(0.0, next_at - time.monotonic()))
                break
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            self.publish(messages[count % len(messages)])
            count += 1
            next_at = max(next_at + 1.0 / rate, time.monotonic() - 0.5 / rate)
        end = max(time.monotonic(), start + 1e-3)
        return count, start, end

    # --- waiting --------------------------------------------------------------------
    def wait_ready(self, node_fqn: str, keys: list[str], timeout: float, process=None) -> str:
        """'' once the node subscribed to the images, publishes its outputs and sent
        diagnostics; else what is missing."""
        deadline = time.monotonic() + timeout
        while True:
            missing = []
            if self.image_pub.get_subscription_count() < len(keys):
                missing.append("image subscription")
            if node_fqn not in self.diagnostics:
                missing.append(f"{node_fqn} diagnostics")
            missing += [f"{self.output_topics[k]} publisher" for k in keys
                        if not self.node.count_publishers(self.output_topics[k])]
            if not missing:
                return ""
            if process is not None and process.poll() is not None:
                return f"process exited with code {process.returncode}"
            if time.monotonic() > deadline:
                return f"after {timeout:.0f} s no " + ", ".join(missing)
            time.sleep(0.1)

    def settled_counters(self, node_fqn: str, after: float, timeout: float) -> tuple[dict, bool]:
        """The node's counters from a /diagnostics message sent after ``after`` with nothing
        in progress (received = processed + dropped + rejected) and nothing still in flight
        (received unchanged since the previous message). (counters, settled)."""
        deadline = time.monotonic() + timeout
        while True:
            history = [(t, c) for t, c in self.diagnostics.get(node_fqn, []) if t > after]
            if len(history) >= 2:
                (_, prev), (_, last) = history[-2], history[-1]
                if last["received"] == last["processed"] + last["dropped"] + last["rejected"] \
                        and last["received"] == prev["received"]:
                    return last, True
            if time.monotonic() > deadline:
                latest = self.diagnostics.get(node_fqn, [(0, {})])[-1][1]
                return latest, False
            time.sleep(0.1)

    def processed(self, node_fqn: str) -> int:
        history = self.diagnostics.get(node_fqn)
        return history[-1][1]["processed"] if history else 0

    def outputs_between(self, key: str, start: float, end: float) -> list[tuple[float, float, int]]:
        """(publish time, arrival time, items) of outputs whose frame was published in [start, end]."""
        found = []
        for stamp, arrived, items in list(self.arrivals[key]):
            sent = self.published.get(stamp)
            if sent is not None and start <= sent <= end:
                found.append((sent, arrived, items))
        return found


def image_messages(frames: list[np.ndarray]) -> list:
    from kp_ros.ros.conversions import array_to_image_msg
    messages = [array_to_image_msg(frame, "rgb8") for frame in frames]
    for msg in messages:
        msg.header.frame_id = "camera"
    return messages


# --- the live benchmark ---------------------------------------------------------------

def counter_delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in ("received", "processed", "dropped", "rejected")}


def calibrate(client: StreamClient, key: str, node_fqn: str, messages: list, min_outputs: int,
              max_seconds: float, min_seconds: float = 3.0) -> dict:
    """The node's processing rate at saturation: publish faster than it can process and
    time the outputs (the first frames, with one-off initialisation, are a warm-up)."""
    # Warm-up: three frames one at a time (one-off initialisation; ELoFTR's first has no output).
    for _ in range(3):
        done = client.processed(node_fqn) + 1
        client.publish(messages[len(client.published) % len(messages)])
        deadline = time.monotonic() + 120.0
        while client.processed(node_fqn) < done and time.monotonic() < deadline:
            time.sleep(0.05)
    for rate in (CAMERA_RATE, MAX_PUBLISH_RATE):  # the faster one only if the model keeps up with a camera
        start_count, began = len(client.arrivals[key]), time.monotonic()
        count, start, end = client.stream(messages, rate, max_seconds, stop=lambda: (
            len(client.arrivals[key]) - start_count >= min_outputs and time.monotonic() - began >= min_seconds))
        arrived = sorted(a for _, a, _ in client.outputs_between(key, start, end) if a <= end)
        if len(arrived) >= 3:  # the median gap between outputs: one slow or fast frame does not skew it
            measured = 1.0 / float(np.median(np.diff(arrived)))
        elif len(arrived) == 2:
            measured = 1.0 / (arrived[1] - arrived[0])
        else:  # slower than one output per calibration window: a lower bound
            measured = max(len(arrived), 1) / (end - start)
        if measured < 0.8 * rate:
            break
        time.sleep(0.5)  # let the slot drain before the next, faster try
    return {"rate_hz": measured, "period_ms": 1e3 / measured, "outputs": len(arrived),
            "published": count, "seconds": end - start, "input_hz": rate}


def run_rate(client: StreamClient, key: str, node_fqn: str, messages: list, rate: float,
             duration: float, period: float, before: tuple[dict, bool]) -> dict:
    """One input rate; ``before`` = the settled counters from the previous step."""
    (before, settled0) = before
    published, start, end = client.stream(messages, rate, duration)
    after, settled1 = client.settled_counters(node_fqn, end, 2 * period + 5.0)
    time.sleep(0.2)  # outputs of the last frames
    counts = counter_delta(before, after)
    outputs = client.outputs_between(key, start, end)
    latencies = [arrived - sent for sent, arrived, _ in outputs]
    elapsed = end - start
    return {
        "target_hz": rate, "published": published, "publish_hz": published / elapsed,
        "seconds": elapsed, **counts, "lost_in_transport": published - counts["received"],
        "drop_pct": 100.0 * (published - counts["processed"]) / max(published, 1),
        "outputs": len(outputs), "output_hz": len(outputs) / elapsed,
        "items_median": float(np.median([n for *_, n in outputs])) if outputs else 0.0,
        "latency_ms": percentiles_ms(latencies), "settled": settled0 and settled1,
        "counters_after": (after, settled1),
    }


def bench_node(key: str, model_dir: Path, device: str, messages: list, factors: list[float],
               duration: float | None, out_dir: Path, log, threads: int | None = None,
               tag: str = "", calibration_outputs: int = 6) -> dict:
    from kp_ros import msg as kp_msgs
    executable, topic, type_name, count_field = NODES[key]
    image_topic = f"/kp_ros_bench/{key}/image"
    node_fqn = f"/{executable}"
    # The rates here follow the model's speed: 0.5x of full-size EfficientLoFTR on a CPU
    # spaces *received* frames ~4 s apart, beyond the default max_frame_gap (1.5 s, which
    # a real camera never nears), which would reset the stream on every frame.
    params = {"max_frame_gap": 0.0} if key == "eloftr" else {}
    params["diagnostics_period"] = DIAGNOSTICS_PERIOD
    log_path = out_dir / "logs" / f"live{tag}_{executable}.log"
    client = StreamClient(image_topic, {key: (topic, getattr(kp_msgs, type_name), count_field)})
    process = start_node(key, model_dir, device, image_topic, log_path, params, threads)
    result = {"node": executable, "device": device, "params": params, "threads": threads, "steps": []}
    try:
        problem = client.wait_ready(node_fqn, [key], timeout=180.0, process=process)
        if problem:
            raise RuntimeError(f"{executable} did not come up ({problem}); see {log_path}")
        calib = calibrate(client, key, node_fqn, messages, min_outputs=calibration_outputs, max_seconds=60.0)
        result["calibration"] = calib
        log(f"  {executable}: processing rate at saturation {calib['rate_hz']:.2f} Hz "
            f"({calib['period_ms']:.0f} ms per frame)")
        period = calib["period_ms"] / 1e3
        step_seconds = duration or float(np.clip(15.0 * period, 10.0, 40.0))
        rates = sorted({min(f * calib["rate_hz"], MAX_PUBLISH_RATE) for f in factors})
        if rates[-1] < CAMERA_RATE:
            rates.append(CAMERA_RATE)
        counters = client.settled_counters(node_fqn, time.monotonic(), 2 * period + 5.0)
        for rate in rates:
            step = run_rate(client, key, node_fqn, messages, rate, step_seconds, period, counters)
            counters = step.pop("counters_after")
            step["factor"] = rate / calib["rate_hz"]
            result["steps"].append(step)
            lat = step["latency_ms"]
            log(f"  {executable}: {rate:7.2f} Hz in -> {step['output_hz']:6.2f} Hz out, "
                f"drops {step['drop_pct']:5.1f}%, latency median/p95/max "
                f"{fmt(lat['median'])}/{fmt(lat['p95'])}/{fmt(lat['max'])} ms")
    finally:
        code, counters = stop_node(process, log_path)
        client.close()
        result["exit_code"], result["shutdown_counters"] = code, counters
    ok = [s["target_hz"] for s in result["steps"] if s["drop_pct"] < DROP_LIMIT_PCT]
    result["max_rate_under_5pct_hz"] = max(ok) if ok else None
    return result


def fmt(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    threads = f", node torch threads capped at {meta['node_threads']}" if meta.get("node_threads") else ""
    lines = [f"### Live stream over DDS ({meta['size']} random-init, {meta['device']}, "
             f"{meta['frames']}, FASTDDS_BUILTIN_TRANSPORTS={meta['transports']}{threads})", "",
             "Each node alone in its own process; frames published with sensor-data QoS. "
             "Drops = 1 - processed/published (keep-latest drops + transport losses). "
             "Latency = publish() here -> output arrival here.", ""]
    for key, res in results["nodes"].items():
        if "error" in res:
            lines += [f"**{key}: failed** - {res['error']}", ""]
            continue
        calib = res["calibration"]
        lines += [f"**{res['node']}**: processing rate at saturation {calib['rate_hz']:.2f} Hz "
                  f"({calib['period_ms']:.0f} ms/frame); highest tested rate with < {DROP_LIMIT_PCT:.0f}% "
                  f"drops: **{fmt(res['max_rate_under_5pct_hz'], 2)} Hz**"
                  + "".join(f"; {k}:={v}" for k, v in res["params"].items() if k != "diagnostics_period"),
                  "",
                  "| input Hz (x model) | published | processed | dropped (slot) | lost (DDS) | drops % "
                  "| output Hz | latency median ms | p95 ms | max ms | max / frame time |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in res["steps"]:
            lat = s["latency_ms"]
            bound = "-" if lat["max"] is None else f"{lat['max'] / calib['period_ms']:.1f}"
            lines.append(
                f"| {s['publish_hz']:.2f} ({s['factor']:.1f}x) | {s['published']} | {s['processed']} | "
                f"{s['dropped']} | {s['lost_in_transport']} | {s['drop_pct']:.1f} | {s['output_hz']:.2f} | "
                f"{fmt(lat['median'])} | {fmt(lat['p95'])} | {fmt(lat['max'])} | {bound}"
                f"{'' if s['settled'] else ' (counters unsettled)'} |")
        lines.append("")
    lines.append("Keep-latest bound: a frame waits at most one frame time in the slot, then takes one "
                 "to process, so max latency stays near 2x the frame time at any input rate "
                 "instead of growing with a queue.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--nodes", default="superpoint,eloftr")
    parser.add_argument("--factors", default="0.5,1,2,4", help="input rates, x the node's processing rate")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per rate (default: 15 frame times, within 10..40 s)")
    parser.add_argument("--node-threads", type=int, default=None,
                        help="cap the node processes' torch threads (OMP_NUM_THREADS); default: torch's")
    parser.add_argument("--calibration-outputs", type=int, default=6)
    parser.add_argument("--tag", default="", help="suffix of the output files, e.g. _threads1")
    parser.add_argument("--domain-id", type=int, default=97)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    setup_env(args.domain_id)
    args.out.mkdir(parents=True, exist_ok=True)

    began = time.monotonic()

    def log(text):
        print(f"[{time.monotonic() - began:4.0f} s] {text}", file=sys.stderr, flush=True)

    device = resolve_device_name(args.device)
    dirs = model_dirs(args.size, args.out)
    frames, source = load_frames()
    messages = image_messages(frames)
    factors = [float(f) for f in args.factors.split(",")]
    results = {"meta": {"size": args.size, "device": device, "frames": source,
                        "transports": os.environ.get("FASTDDS_BUILTIN_TRANSPORTS", ""),
                        "factors": factors, "node_threads": args.node_threads}, "nodes": {}}
    for key in args.nodes.split(","):
        log(f"live: {NODES[key][0]} ({args.size}, {device})")
        try:
            results["nodes"][key] = bench_node(key, dirs[key], device, messages, factors,
                                               args.duration, args.out, log, args.node_threads,
                                               args.tag, args.calibration_outputs)
        except Exception as exc:  # noqa: BLE001 - report it, go on with the other node
            results["nodes"][key] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  failed: {exc}")
    (args.out / f"live{args.tag}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / f"live{args.tag}.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
