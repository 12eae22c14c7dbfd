"""Node overhead: the share of a node's per-frame time that is not the model forward.

    python bench/bench_node_overhead.py [--size tiny|full] [--device auto] [--runs N] [--out DIR]

Each node class is constructed in-process (an rclpy context of its own, parameters as
overrides) and fed real 640x480 rgb8 Image messages through the path its subscription
takes: the message is serialized and deserialized as DDS delivers it ("receive", on the
executor thread in the node), then the worker's handler runs (decode -> core -> message
-> publish, with a subscriber attached so publish really serializes and sends). The
benchmark wraps the core's stage methods and the node module's message helpers to time
them; the node code itself is unchanged.

Stages: receive (deserialize), decode (Image -> array), preprocess, forward (the network:
SuperPoint encoder + heads; ELoFTR backbone, transformer, coarse matching, refinement -
what the reference ``model(...)`` runs), post-process (SuperPoint NMS/selection/sampling;
ELoFTR source-pixel scaling), message fill, publish, other (the rest of the node's code).
Overhead = (total - forward) / forward; the ROS-shell share counts only what is not in
the core (receive, decode, message fill, publish, other).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_live import REPO, load_frames, model_dirs, resolve_device_name, setup_env  # noqa: E402

STAGES = ("receive", "decode", "preprocess", "forward", "post-process", "message fill", "publish", "other")
CORE_STAGES = ("preprocess", "forward", "post-process")
TARGET_PCT = 5.0


class StageClock:
    """Accumulates wall time per stage for the current frame (CUDA synchronized)."""

    def __init__(self, cuda: bool):
        import torch
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.frame: dict[str, float] = {}
        self.frames: list[dict[str, float]] = []

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.frame[stage] = self.frame.get(stage, 0.0) + time.perf_counter() - start
        return timed

    def run(self, fn, *args):
        """Time one whole frame; 'other' is what no wrapped stage accounts for."""
        self.frame = {}
        self.sync()
        start = time.perf_counter()
        fn(*args)
        self.sync()
        total = time.perf_counter() - start
        self.frame["other"] = total - sum(v for k, v in self.frame.items() if k in STAGES)
        self.frame["total"] = total
        return self.frame


def instrument(node, key: str, clock: StageClock, monkeypatch: list) -> None:
    """Wrap the stages on the node's core and the message helpers the node module uses."""
    import kp_ros.ros.feature_node as feature_node
    core = node.core
    patches = [(feature_node, "image_msg_to_model_input", "decode")]
    if key == "superpoint":
        import kp_ros.nodes.superpoint_node as module
        patches.append((module, "keypoints_to_msg", "message fill"))
        stages = {"preprocess": ("preprocess",), "forward": ("forward",), "post-process": ("postprocess",)}
    else:
        import kp_ros.nodes.eloftr_node as module
        patches.append((module, "matches_to_msg", "message fill"))
        stages = {"preprocess": ("preprocess",),
                  "forward": ("extract", "transform", "match_coarse", "select", "fine_windows", "refine_windows"),
                  "post-process": ("finish",)}
    for owner, name, stage in patches:
        original = getattr(owner, name)
        monkeypatch.append((owner, name, original))
        setattr(owner, name, clock.wrap(stage, original))
    for stage, methods in stages.items():
        for method in methods:  # instance attributes shadow the class's methods
            setattr(core, method, clock.wrap(stage, getattr(core, method)))
    publish = clock.wrap("publish", node._pub.publish)

    def publish_and_count(msg):
        clock.frame["items"] = len(msg.x if key == "superpoint" else msg.x0)
        return publish(msg)
    node._pub.publish = publish_and_count


def bench_node(key: str, model_dir: Path, device: str, frames: list, runs: int, warmup: int) -> dict:
    import rclpy
    from rclpy.parameter import Parameter
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image

    from kp_ros import msg as kp_msgs
    from kp_ros.ros.conversions import array_to_image_msg
    from kp_ros.ros.qos import output_qos

    if key == "superpoint":
        from kp_ros.nodes.superpoint_node import SuperPointNode as NodeClass
        out_type, out_topic = kp_msgs.Keypoints, "keypoints"
    else:
        from kp_ros.nodes.eloftr_node import EfficientLoFTRNode as NodeClass
        out_type, out_topic = kp_msgs.Matches, "matches"

    context = rclpy.Context()
    rclpy.init(context=context)
    patched: list = []
    try:
        node = NodeClass(context=context, parameter_overrides=[
            Parameter("model", value=str(model_dir)), Parameter("device", value=device)])
        listener = rclpy.create_node("kp_ros_bench_listener", context=context)
        listener.create_subscription(out_type, out_topic, lambda msg: None, output_qos())
        clock = StageClock(node.core.device.type == "cuda")
        instrument(node, key, clock, patched)
        deadline = time.monotonic() + 5.0  # let the listener match, so publish sends
        while node._pub.get_subscription_count() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)

        def receive_and_process(wire: bytes) -> None:
            msg = clock.wrap("receive", deserialize_message)(wire, Image)
            node._process_frame((msg, node.on_arrival(msg)))

        results = []
        for index in range(warmup + runs):
            msg = array_to_image_msg(frames[index % len(frames)], "rgb8")
            msg.header.frame_id = "camera"
            msg.header.stamp.sec, msg.header.stamp.nanosec = 1000 + index // 30, (index % 30) * 33_333_333
            frame = clock.run(receive_and_process, serialize_message(msg))
            if key == "eloftr" and index == 0:
                continue  # the first frame has nothing to match: no forward of the pair
            if index >= warmup:
                results.append(frame)
        info = {"model_id": node.core.model_id, "device": str(node.core.device)}
        node.shutdown()
        node.destroy_node()
        listener.destroy_node()
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
        rclpy.shutdown(context=context)
    return summarize(results) | info


def summarize(frames: list[dict[str, float]]) -> dict:
    median = {s: 1e3 * float(np.median([f.get(s, 0.0) for f in frames])) for s in STAGES + ("total",)}
    overhead = [(f["total"] - f["forward"]) / f["forward"] for f in frames]
    shell = [(f["total"] - sum(f.get(s, 0.0) for s in CORE_STAGES)) / f["forward"] for f in frames]
    return {"runs": len(frames), "median_ms": median,
            "items_median": float(np.median([f.get("items", 0) for f in frames])),
            "overhead_pct": 100 * float(np.median(overhead)),
            "shell_pct": 100 * float(np.median(shell))}


def markdown(results: dict) -> str:
    meta = results["meta"]
    nodes = [k for k in ("superpoint", "eloftr") if k in results["nodes"]]
    names = {"superpoint": "superpoint_node", "eloftr": "eloftr_node"}
    lines = [f"### Node overhead per frame ({meta['size']} random-init, {meta['device']}, {meta['frames']}, "
             f"median ms over {meta['runs']} frames, torch {meta['torch']}, {meta['threads']} threads)", "",
             "| stage | " + " | ".join(names[k] for k in nodes) + " |",
             "|---|" + "---:|" * len(nodes)]
    for stage in STAGES + ("total",):
        cells = []
        for key in nodes:
            res = results["nodes"][key]
            cells.append("failed" if "error" in res else f"{res['median_ms'][stage]:.2f}")
        label = f"**{stage}**" if stage == "total" else stage
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def row(label, field):
        cells = []
        for key in nodes:
            res = results["nodes"][key]
            if "error" in res:
                cells.append("-")
            else:
                value = res[field]
                cells.append(f"{value:.1f}%" + (" ok" if value <= TARGET_PCT else " > target"))
        return f"| {label} | " + " | ".join(cells) + " |"
    lines.append("| keypoints / matches per frame | " + " | ".join(
        "-" if "error" in results["nodes"][k] else f"{results['nodes'][k]['items_median']:.0f}"
        for k in nodes) + " |")
    lines += [row("overhead (total - forward) / forward", "overhead_pct"),
              row("ROS shell only (total - pre - forward - post) / forward", "shell_pct"), "",
              f"Target: overhead <= {TARGET_PCT:.0f}% of the forward. 'receive' runs on the node's "
              "executor thread (DDS deserialization), the rest on its worker thread."]
    for key in nodes:
        if "error" in results["nodes"][key]:
            lines.append(f"\n{names[key]} failed: {results['nodes'][key]['error']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--nodes", default="superpoint,eloftr")
    parser.add_argument("--runs", type=int, default=None, help="timed frames per node "
                        "(default: 8 full-size, 20 tiny)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--domain-id", type=int, default=96)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    setup_env(args.domain_id)
    import torch
    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.runs or (8 if args.size == "full" else 20)
    device = resolve_device_name(args.device)
    dirs = model_dirs(args.size, args.out)
    frames, source = load_frames()
    results = {"meta": {"size": args.size, "device": device, "frames": source, "runs": runs,
                        "torch": torch.__version__, "threads": torch.get_num_threads()}, "nodes": {}}
    for key in args.nodes.split(","):
        print(f"overhead: {key} ({args.size}, {device})", file=sys.stderr, flush=True)
        try:
            results["nodes"][key] = bench_node(key, dirs[key], device, frames, runs, args.warmup)
        except Exception as exc:  # noqa: BLE001 - report it, go on with the other node
            results["nodes"][key] = {"error": f"{type(exc).__name__}: {exc}"}
    (args.out / "node_overhead.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "node_overhead.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
