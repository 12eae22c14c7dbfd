"""kp_demo: superpoint_node and eloftr_node on real camera frames, end to end over DDS.

Starts both node executables, publishes the frames of a folder (default: the shared TUM
frames) in lockstep, and writes the nodes' debug overlays and per-frame statistics to
an output folder. When pretrained weights cannot be reached it says so loudly and runs
on random-init weights of the real architecture sizes, so the whole pipeline still runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from kp_ros.core import models as registry
from kp_ros.core.package_files import package_file
from kp_ros.testing import node_process
from kp_ros.testing.node_process import IN_SOURCE_TREE, SOURCE_ROOT

# Run from a source checkout (scripts/demo), the shared TUM frames lie beside the repository;
# installed (colcon, the venv), pass --frames. The parameters file is the installed one.
DEFAULT_FRAMES = (SOURCE_ROOT.parent / "shared" / "data" / "tum_fr3_long_office_household"
                  if IN_SOURCE_TREE else None)
# The demo's two nodes, from the model registry: the default detector and dense matcher.
DEMO_MODELS = (registry.model("superpoint"), registry.model("eloftr"))


def resolve_model(node: str, model: str, cache: Path) -> tuple[str, bool]:
    """(model to use, is_random). Falls back to random-init full-size weights, loudly."""
    from kp_ros.core.model_loading import ModelUnavailableError, load_pretrained
    from kp_ros.offline.model_setup import loud_warning, random_init_stand_in
    from transformers import AutoConfig
    try:
        load_pretrained(AutoConfig, model)
        return model, False
    except ModelUnavailableError as exc:
        reason = str(exc)
    target = random_init_stand_in(registry.for_node(node).name, cache / f"{node}_random_full_seed0")
    loud_warning(f"!! {node}: PRETRAINED WEIGHTS UNAVAILABLE, RUNNING ON RANDOM-INIT WEIGHTS.\n"
                 f"!! Keypoints and matches below are NOT meaningful; the pipeline (nodes, DDS,\n"
                 f"!! messages, overlays, stats) is real. Reason:\n!! {reason}\n"
                 f"!! Random-init model: {target}")
    return str(target), True


def load_frames(folder: Path, limit: int) -> list[tuple[float, np.ndarray]]:
    from PIL import Image
    paths = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]
    frames = []
    for i, path in enumerate(paths):
        try:
            stamp = float(path.stem)  # TUM names are capture times in seconds
        except ValueError:
            stamp = 1.0 + i / 10
        frames.append((stamp, np.asarray(Image.open(path).convert("RGB"))))
    return frames


def start_node(name: str, model: str, device: str, log: Path) -> node_process.NodeProcess:
    """In a source checkout the node runs its code, as this process does (node_env)."""
    return node_process.start_node(
        name, log, params={"model": model, "device": device, "debug_image": True, "reliable_input": True},
        params_file=package_file("config/matcher.yaml"),
        remaps={"__ns": "/kp_demo", "image": "/kp_demo/image_raw"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=Path, default=DEFAULT_FRAMES, help="folder of images (png/jpg)")
    parser.add_argument("--max-frames", type=int, default=17)
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--device", default="auto")
    for entry in DEMO_MODELS:
        parser.add_argument(f"--{entry.name}-model", default=entry.default_model,
                            help=f"{entry.title} hub id or local directory")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one frame's outputs")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("ROS_LOG_DIR", str(Path(os.environ.get("HOME", "/tmp")) / ".ros" / "log"))
    if args.frames is None or not args.frames.is_dir():
        print(f"kp_demo: no frames folder {args.frames} (pass --frames DIR)", file=sys.stderr)
        return 2
    frames = load_frames(args.frames, args.max_frames)
    if len(frames) < 2:
        print(f"kp_demo: need at least 2 images in {args.frames}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kp_ros"
    models = {entry.node: resolve_model(entry.node, getattr(args, f"{entry.name}_model"), cache)
              for entry in DEMO_MODELS}
    logs = {name: args.out / f"{name}.log" for name in models}
    procs = {name: start_node(name, model, args.device, logs[name]) for name, (model, _) in models.items()}
    rows, exit_code = [], 0
    try:
        rows = run_frames(frames, args, procs, logs)
    except (RuntimeError, KeyboardInterrupt) as exc:
        print(f"kp_demo: stopped: {exc}", file=sys.stderr)
        exit_code = 1
    finally:
        node_process.stop_nodes(procs.values(), timeout=60)
    write_stats(args, rows, models, {name: node_process.shutdown_summary(procs[name].log_text())
                                     or "no counters logged" for name in logs})
    return exit_code


def run_frames(frames, args, procs, logs) -> list[dict]:
    """Publish each frame, wait for its outputs, save its overlays: one stats row each."""
    import rclpy
    from sensor_msgs.msg import Image
    from kp_ros.msg import Keypoints, Matches
    from kp_ros.ros.qos import output_qos

    rclpy.init()
    node = rclpy.create_node("kp_demo")
    got = {"keypoints": {}, "matches": {}, "kp_debug": {}, "m_debug": {}}

    def keep(kind):
        return lambda msg: got[kind].__setitem__((msg.header.stamp.sec, msg.header.stamp.nanosec),
                                                 (time.monotonic(), msg))

    node.create_subscription(Keypoints, "/kp_demo/keypoints", keep("keypoints"), output_qos())
    node.create_subscription(Matches, "/kp_demo/matches", keep("matches"), output_qos())
    node.create_subscription(Image, "/kp_demo/superpoint_node/debug_image", keep("kp_debug"), output_qos())
    node.create_subscription(Image, "/kp_demo/eloftr_node/debug_image", keep("m_debug"), output_qos())
    pub = node.create_publisher(Image, "/kp_demo/image_raw", output_qos())
    try:
        deadline = time.monotonic() + 180
        while pub.get_subscription_count() < 2 and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
            if any(p.poll() is not None for p in procs.values()):
                raise RuntimeError("a node exited at start; see " + ", ".join(map(str, logs.values())))
        print(f"kp_demo: {len(frames)} frames from {args.frames} -> {args.out}/", flush=True)
        return [frame_row(node, pub, got, i, stamp, image, args)
                for i, (stamp, image) in enumerate(frames)]
    finally:
        node.destroy_node()
        rclpy.shutdown()


def frame_row(node, pub, got, i: int, stamp: float, image, args) -> dict:
    """Publish frame ``i``, wait for its keypoints (and matches), save the overlays."""
    import rclpy
    from builtin_interfaces.msg import Time
    from PIL import Image as PILImage
    from kp_ros.ros.conversions import array_to_image_msg, image_msg_to_array

    msg = array_to_image_msg(image, "rgb8")
    msg.header.stamp = Time(sec=int(stamp), nanosec=int(round((stamp % 1) * 1e9)))
    msg.header.frame_id = "camera_rgb_optical_frame"
    key = (msg.header.stamp.sec, msg.header.stamp.nanosec)
    wanted = ["keypoints", "kp_debug"] + (["matches", "m_debug"] if i else [])
    sent = time.monotonic()
    pub.publish(msg)
    end = sent + args.timeout
    while time.monotonic() < end and not all(key in got[k] for k in wanted):
        rclpy.spin_once(node, timeout_sec=0.05)
    missing = [k for k in wanted if key not in got[k]]
    if missing:
        raise RuntimeError(f"frame {i}: no {missing} within {args.timeout} s")
    kp_time, kp = got["keypoints"][key]
    row = {"frame": i, "stamp": stamp, "keypoints": len(kp.x),
           "keypoints_latency_ms": round(1e3 * (kp_time - sent), 1)}
    PILImage.fromarray(image_msg_to_array(got["kp_debug"][key][1])).save(args.out / f"keypoints_{i:03d}.png")
    if i:
        m_time, m = got["matches"][key]
        row.update(matches=len(m.x0), matches_latency_ms=round(1e3 * (m_time - sent), 1),
                   mean_match_score=round(float(np.mean(m.scores)), 4) if len(m.scores) else 0.0)
        PILImage.fromarray(image_msg_to_array(got["m_debug"][key][1])).save(args.out / f"matches_{i:03d}.png")
    print(f"  frame {i:2d}: {row['keypoints']:5d} keypoints ({row['keypoints_latency_ms']:7.1f} ms)"
          + (f", {row['matches']:5d} matches ({row['matches_latency_ms']:7.1f} ms)" if i else ""), flush=True)
    return row


def write_stats(args, rows: list[dict], models: dict, counters: dict) -> None:
    """stats.json and the printed summary."""
    def median(key, rows):
        return statistics.median(r[key] for r in rows) if rows else 0

    stats = {
        "frames": len(rows), "source": str(args.frames),
        "models": {name: {"model": m, "random_init": r} for name, (m, r) in models.items()},
        "keypoints_per_frame_mean": statistics.fmean(r["keypoints"] for r in rows) if rows else 0,
        "matches_per_pair_mean": statistics.fmean(r["matches"] for r in rows[1:]) if len(rows) > 1 else 0,
        "keypoints_latency_ms_median": median("keypoints_latency_ms", rows),
        "matches_latency_ms_median": median("matches_latency_ms", rows[1:]),
        "node_counters": counters, "per_frame": rows,
    }
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(f"\nkp_demo summary ({args.out}/stats.json, overlays {args.out}/*.png):")
    for key in ("frames", "keypoints_per_frame_mean", "matches_per_pair_mean",
                "keypoints_latency_ms_median", "matches_latency_ms_median"):
        print(f"  {key}: {stats[key]:.1f}" if isinstance(stats[key], float) else f"  {key}: {stats[key]}")
    for name, text in counters.items():
        print(f"  {name}: {text}")
    if any(r for _, r in models.values()):
        print("  NOTE: random-init weights were used (pretrained weights unreachable); see the warning above.")


if __name__ == "__main__":
    raise SystemExit(main())
