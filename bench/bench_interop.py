"""Frames that reach superpoint_node from somebody else's camera, over DDS as users run it.

    python bench/bench_interop.py [--size tiny|full] [--rate 30] [--duration 20]
                                  [--sizes 640x480,1280x720] [--out DIR]

The camera is test/plain_camera.py in a clean environment (no FASTDDS_* variable, as a
camera driver or ``ros2 bag play`` in another shell); the node runs with the shipped
config/matcher.yaml (reliable_input: auto). For each image size, each publisher
reliability (reliable / best effort, history depth 10 as image_transport's default; plus a
reliable publisher with a deeper history) and each transport set-up (--setups: the
defaults; the shipped Fast DDS profiles of config/fastdds on the camera's side, the node's
side or both; FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA on both sides) it streams rgb8 frames
at --rate for --duration s and reports: frames the node received of those sent (its own
counter), publish-to-Keypoints latency (the camera process times both: one clock), and
whether a `ros2` CLI in a plain shell (no FASTDDS_* variable), run while frames flow, lists
the camera's topic and measures a rate on /keypoints (discovery with default participants). With tiny models
(default) the node keeps up with far more than the camera, so losses are the transport's;
latency includes one tiny-model forward. Writes interop.md / interop.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_live import REPO, model_dirs, setup_env, start_node, stop_node  # noqa: E402

CAMERA = REPO / "test" / "plain_camera.py"
TOPIC = "/interop/image_raw"
PROFILES = REPO / "config" / "fastdds"
CAMERA_PROFILE = {"FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILES / "camera_large_frames.xml")}
NODE_PROFILE = {"FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILES / "kp_ros_nodes.xml")}
LARGE_DATA = {"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"}
# name: (label, camera side's environment, node side's environment)
SETUPS = {
    "default": ("default (both sides)", {}, {}),
    "camera_profile": ("camera_large_frames.xml on the camera", CAMERA_PROFILE, {}),
    "node_profile": ("kp_ros_nodes.xml on the node", {}, NODE_PROFILE),
    "both_profiles": ("both profiles", CAMERA_PROFILE, NODE_PROFILE),
    "large_data": ("LARGE_DATA (both sides)", LARGE_DATA, LARGE_DATA),
}
FASTDDS_VARIABLES = ("FASTDDS_BUILTIN_TRANSPORTS", "FASTDDS_DEFAULT_PROFILES_FILE")


def clean_env(extra: dict | None = None) -> dict:
    """A plain shell with ROS sourced, plus ``extra`` (this side's Fast DDS settings)."""
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
           "HOME": os.environ.get("HOME", "/tmp"), "ROS_DOMAIN_ID": os.environ["ROS_DOMAIN_ID"],
           "AMENT_PREFIX_PATH": os.environ.get("AMENT_PREFIX_PATH", ""), "PYTHONUNBUFFERED": "1"}
    return {**env, **(extra or {})}


def plain_shell_cli_sees(topics: list[str]) -> dict:
    """What a `ros2` CLI in a plain shell sees now: the topics it lists of ``topics``, and
    whether `ros2 topic hz` measures a rate on the last one."""
    env = clean_env()
    hz = subprocess.Popen(["timeout", "-s", "INT", "-k", "5", "12", "ros2", "topic", "hz", topics[-1]],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listed = subprocess.run(["ros2", "topic", "list", "--no-daemon", "--spin-time", "3"], env=env,
                            capture_output=True, text=True, timeout=60).stdout.split()
    hz = hz.communicate(timeout=60)[0]
    return {"listed": [t for t in topics if t in listed], "hz_ok": "average rate" in hz}


def run_case(model_dir: Path, size: tuple[int, int], reliability: str, setup: str,
             rate: float, duration: float, logs: Path, depth: int = 10) -> dict:
    width, height = size
    label, camera_side, node_side = SETUPS[setup]
    name = f"{width}x{height}_{reliability}_{setup}_depth{depth}"
    log_path = logs / f"interop_{name}.log"
    for variable in FASTDDS_VARIABLES:  # the node's side
        os.environ.pop(variable, None)
    os.environ.update(node_side)
    node = start_node("superpoint", model_dir, "cpu", TOPIC, log_path, params={"max_keypoints": 1024})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and " on /" not in log_path.read_text():
            time.sleep(0.2)
        count = int(rate * duration)
        camera_process = subprocess.Popen(
            [sys.executable, str(CAMERA), "--topic", TOPIC, "--rate", str(rate), "--count", str(count),
             "--width", str(width), "--height", str(height), "--reliability", reliability,
             "--depth", str(depth),
             "--listen", "/keypoints", "--linger", "3"],
            env=clean_env(camera_side), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(min(3.0, duration / 3))
        cli = plain_shell_cli_sees([TOPIC, "/keypoints"])
        stdout, stderr = camera_process.communicate(timeout=duration + 180)
        camera = subprocess.CompletedProcess(camera_process.args, camera_process.returncode,
                                             stdout, stderr)
    finally:
        code, counters = stop_node(node, log_path)
    if camera.returncode != 0:
        raise RuntimeError(f"{name}: camera failed: {camera.stderr[-2000:]}")
    result = json.loads(camera.stdout.strip().splitlines()[-1])
    latencies = [result["arrivals"][k] - result["published"][k] for k in result["arrivals"]
                 if k in result["published"]]
    ms = 1e3 * np.asarray(latencies) if latencies else np.zeros(0)
    sent = result["sent"]
    received = counters.get("received", 0)
    row = {"size": f"{width}x{height}", "publisher": f"{reliability}, depth {depth}",
           "transports": label, "sent": sent, "received": received,
           "received_pct": 100.0 * received / sent if sent else 0.0,
           "processed": counters.get("processed", 0), "matched": result["matched"],
           "latency_median_ms": float(np.median(ms)) if ms.size else None,
           "latency_p95_ms": float(np.percentile(ms, 95)) if ms.size else None,
           "publish_seconds": result["seconds"], "node_exit": code,
           "cli_listed": len(cli["listed"]), "cli_hz": cli["hz_ok"]}
    print(f"{name}: received {received}/{sent} ({row['received_pct']:.1f} %), latency median "
          f"{row['latency_median_ms'] or float('nan'):.1f} ms", file=sys.stderr, flush=True)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Frames a plain-environment camera sent at {meta['rate']:g} Hz for {meta['duration']:g} s "
             f"(rgb8) and superpoint_node received (defaults: reliable_input auto; {meta['models']} "
             f"models; load at start {meta['load']})", "",
             "| image | publisher QoS | transports | received / sent | % | latency median / p95 (ms) "
             "| plain-shell ros2: topics listed, hz /keypoints |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        latency = ("-" if r["latency_median_ms"] is None
                   else f"{r['latency_median_ms']:.1f} / {r['latency_p95_ms']:.1f}")
        lines.append(f"| {r['size']} | {r['publisher']} | {r['transports']} | {r['received']} / "
                     f"{r['sent']} | {r['received_pct']:.1f} | {latency} | {r['cli_listed']} / 2, "
                     f"{'yes' if r['cli_hz'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny", help="model size")
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--sizes", default="640x480,1280x720")
    parser.add_argument("--domain-id", type=int, default=91)
    parser.add_argument("--deep-publisher", type=int, default=50,
                        help="also run reliable publishers on the default transports with this "
                             "history depth (10 is image_transport's default; 0: skip)")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help="transport set-ups, comma-separated (default: all: %(default)s)")
    parser.add_argument("--reliabilities", default="reliable,best_effort")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    setup_env(args.domain_id)
    args.out.mkdir(parents=True, exist_ok=True)
    models = model_dirs(args.size, args.out)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        for setup in args.setups.split(","):
            for reliability in args.reliabilities.split(","):
                rows.append(run_case(models["superpoint"], size, reliability, setup, args.rate,
                                     args.duration, args.out / "logs"))
            if setup == "default" and args.deep_publisher:
                rows.append(run_case(models["superpoint"], size, "reliable", None, args.rate,
                                     args.duration, args.out / "logs", depth=args.deep_publisher))
    meta = {"rate": args.rate, "duration": args.duration, "models": args.size,
            "load": open("/proc/loadavg").read().split()[0]}
    (args.out / "interop.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = markdown(rows, meta)
    (args.out / "interop.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
