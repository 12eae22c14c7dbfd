"""Do tracks link live? The one-process front-end against the three separate nodes.

    python bench/bench_frontend.py [--duration 60] [--precision fp32] [--device auto]
                                   [--frames shifted|tum] [--matches oracle|model]
                                   [--modes 10hz,own] [--quick]

A reliable 640x480 rgb8 camera (this process) publishes for ``--duration`` s to
(a) frontend_node (detection, matching, tracks of each frame in one process) and
(b) superpoint_node + eloftr_node + track_node (the launch file's ``frontend:=false``),
each started as the launch file starts it (config/matcher.yaml, then overrides), with
full-size random-init models (``--quick``: tiny ones, 20 s, for a smoke run). Modes:
``10hz`` (a camera at 10 Hz, whatever the load) and ``own`` (the model's own rate: the
next frame is published when the previous frame's Tracks arrives). Reported per
configuration and mode: frames published, Tracks received, frames processed (the node's
own counters; for the separate nodes the detector's and the matcher's), linked tracks per
Tracks message, and the share of processed frames whose Tracks link >= 1 track.

Matches: random weights match almost nothing (one true match per 640x480 pair on the
shifted texture, so no track links, in either configuration), so by default (``--matches
oracle``) every EfficientLoFTR stage runs on the random-init model for its cost and its
output is replaced by hand-made features whose matches are true (bench/oracle_node.py);
``--matches model`` keeps the random model's own matches. Parameters are the defaults
except ``match_threshold`` (0.05 for the hand-made features as in the tests; 0 for the
random model, whose confidences are ~1e-4), and, in
``own`` mode, ``max_frame_gap: 0`` (a camera at a CPU model's rate spaces frames beyond
the default 1.5 s, which a real camera never nears: every frame would reset the stream).
Frames: ``shifted`` (default), a synthetic texture moved by 8 px per frame back and forth
(EfficientLoFTR's coarse cell: random weights then find true matches, so links show what
the pipeline allows, not what random weights miss), or ``tum``, the shared TUM fr3 frames
cycled (random weights link few tracks on real images). The output says which.
Timings depend on the machine: run it on a quiet one; a shared one is noted in the output.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_live import (PARAMS_FILE, StreamClient, image_messages, load_frames,  # noqa: E402
                        model_dirs, resolve_device_name, setup_env)
from kp_ros.testing import node_process  # noqa: E402

WIDTH, HEIGHT = 640, 480
SHIFT = 8        # px per frame: EfficientLoFTR's coarse cell
SHIFT_STEPS = 8  # frames one way before the texture moves back
OWN_RATE_TIMEOUT = 120.0  # s a frame waits for its Tracks in 'own' mode before the next is sent


def shifted_frames() -> tuple[list[np.ndarray], str]:
    """A smooth random texture moved SHIFT px per frame right, then back: every consecutive
    pair (the turn included) is an exact SHIFT px move."""
    import cv2
    span = SHIFT * SHIFT_STEPS
    texture = np.random.default_rng(0).integers(0, 256, (HEIGHT // 8, (WIDTH + span) // 8, 3),
                                                dtype=np.uint8)
    base = cv2.resize(texture, (WIDTH + span, HEIGHT), interpolation=cv2.INTER_CUBIC)
    offsets = list(range(0, span + 1, SHIFT)) + list(range(span - SHIFT, 0, -SHIFT))
    frames = [np.ascontiguousarray(base[:, x:x + WIDTH]) for x in offsets]
    return frames, (f"synthetic 640x480 texture shifted {SHIFT} px per frame back and forth "
                    f"({len(frames)} frames cycled)")


class TracksClient(StreamClient):
    """StreamClient with the Tracks' links: per Tracks (stamp), the number of tracks and of
    linked ones (previous_index >= 0)."""

    def __init__(self, image_topic: str, tracks_topic: str):
        from kp_ros.msg import Tracks
        super().__init__(image_topic, {"tracks": (tracks_topic, Tracks, "x")})
        self.links: dict[tuple[int, int], tuple[int, int]] = {}
        self.arrived = threading.Event()
        self.node.create_subscription(Tracks, tracks_topic, self._on_tracks, 50)

    def _on_tracks(self, msg) -> None:
        previous = np.frombuffer(msg.previous_index, np.int32)
        self.links[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = (
            len(previous), int(np.count_nonzero(previous >= 0)))
        self.arrived.set()

    def own_rate(self, messages: list, duration: float) -> tuple[int, float, float]:
        """Publish the next frame when the previous one's Tracks arrived (or after
        OWN_RATE_TIMEOUT), for ``duration`` s."""
        start, count = time.monotonic(), 0
        while time.monotonic() - start < duration:
            self.arrived.clear()
            msg = messages[count % len(messages)]
            self.publish(msg)
            stamp = (msg.header.stamp.sec, msg.header.stamp.nanosec)
            count += 1
            deadline = time.monotonic() + OWN_RATE_TIMEOUT
            while stamp not in self.links and time.monotonic() < deadline:
                self.arrived.wait(0.05)
                self.arrived.clear()
        return count, start, time.monotonic()


def configuration(name: str, dirs: dict, device: str, precision: str, image_topic: str,
                  params: dict, log_dir: Path, oracle: bool) -> list[tuple[str, node_process.NodeProcess]]:
    """The node processes of one configuration, as the launch file starts them (with
    ``oracle``, those running EfficientLoFTR through bench/oracle_node.py)."""
    env = node_process.node_env(source_root=REPO)
    common = {"device": device, "precision": precision, "diagnostics_period": 0.5}

    def start(executable, overrides, remaps):
        command = node_process.node_command(executable, overrides, PARAMS_FILE, remaps)
        if oracle and executable in ("frontend_node", "eloftr_node"):
            command[1:3] = [str(REPO / "bench" / "oracle_node.py"), executable]
        return executable, node_process.NodeProcess(command, log_dir / f"{name}_{executable}.log",
                                                    env, REPO)

    images = {"image": image_topic}
    if name == "frontend":
        return [start("frontend_node", {**common, **params, "superpoint_model": dirs["superpoint"],
                                        "eloftr_model": dirs["eloftr"]}, images)]
    return [start("superpoint_node", {**common, "model": dirs["superpoint"]}, images),
            start("eloftr_node", {**common, **params, "model": dirs["eloftr"]}, images),
            start("track_node", {"diagnostics_period": 0.5}, images)]


def run(name: str, mode: str, dirs: dict, args, messages: list, log_dir: Path, log) -> dict:
    image_topic = f"/kp_ros_bench_frontend/{name}_{mode}/image"
    oracle = args.matches == "oracle"
    params = {"match_threshold": 0.05 if oracle else 0.0}
    if mode == "own":
        params["max_frame_gap"] = 0.0
    client = TracksClient(image_topic, "/tracks")
    nodes = configuration(name, dirs, args.device, args.precision, image_topic, params, log_dir,
                          oracle)
    detector_fqn = "/frontend_node" if name == "frontend" else "/superpoint_node"
    result = {"configuration": name, "mode": mode}
    try:
        problem = client.wait_ready(detector_fqn, ["tracks"] * (1 if name == "frontend" else 2),
                                    timeout=300.0, process=nodes[0][1])
        if problem:
            raise RuntimeError(f"{name} did not come up: {problem}")
        time.sleep(1.0)
        if mode == "10hz":
            published, start, end = client.stream(messages, 10.0, args.duration)
        else:
            published, start, end = client.own_rate(messages, args.duration)
        time.sleep(3.0 if name == "frontend" else 5.0)  # the last frames' outputs (track_node's timeout)
    finally:
        stopped = node_process.stop_nodes([p for _, p in nodes], timeout=120.0)
        client.close()
    counters = {exe: node_process.parse_counters(text) or {} for (exe, _), (_, text) in zip(nodes, stopped)}
    sent = {stamp for stamp, t in client.published.items() if start <= t <= end}
    links = [client.links[s] for s in sent if s in client.links]
    linked = [n for _, n in links]
    processed = counters[nodes[0][0]].get("processed", 0)
    result.update({
        "published": published, "seconds": end - start, "tracks_received": len(links),
        "processed": processed,
        **({"matcher_processed": counters["eloftr_node"].get("processed", 0)} if name != "frontend" else {}),
        "linked_per_tracks_mean": float(np.mean(linked)) if linked else 0.0,
        "linked_per_tracks_median": float(np.median(linked)) if linked else 0.0,
        "tracks_per_message_median": float(np.median([n for n, _ in links])) if links else 0.0,
        "frames_linking": int(sum(1 for n in linked if n > 0)),
        "share_linking": (sum(1 for n in linked if n > 0) / processed) if processed else 0.0,
        "counters": counters,
    })
    log(f"  {name:8s} {mode:4s}: published {published}, processed {processed}, Tracks "
        f"{len(links)}, linked/Tracks {result['linked_per_tracks_mean']:.1f}, frames linking "
        f"{result['frames_linking']} ({100 * result['share_linking']:.0f} % of processed)")
    return result


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"### Live tracks: front-end vs separate nodes ({meta['size']} random-init, "
             f"{meta['device']}, precision {meta['precision']}, {meta['duration']:.0f} s per run)", "",
             f"Frames: {meta['frames']}. Matches: "
             + ("true ones (hand-made features) at the random model's full cost"
                if meta["matches"] == "oracle" else "the random-init model's own") + ". "
             + f"Parameters: {meta['params']}. {meta['note']}", "",
             "| configuration | mode | published | processed (matcher) | Tracks | linked / Tracks "
             "(mean, median) | frames linking >= 1 | share of processed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['configuration']} | {r['mode']} | failed: {r['error']} |||||")
            continue
        matcher = f" ({r['matcher_processed']})" if "matcher_processed" in r else ""
        lines.append(f"| {r['configuration']} | {r['mode']} | {r['published']} | {r['processed']}{matcher} "
                     f"| {r['tracks_received']} | {r['linked_per_tracks_mean']:.1f}, "
                     f"{r['linked_per_tracks_median']:.0f} | {r['frames_linking']} "
                     f"| {100 * r['share_linking']:.0f} % |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=None, help="s per run (default 60; --quick 20)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", choices=("shifted", "tum"), default="shifted")
    parser.add_argument("--matches", choices=("oracle", "model"), default="oracle")
    parser.add_argument("--modes", default="10hz,own")
    parser.add_argument("--configurations", default="frontend,separate")
    parser.add_argument("--quick", action="store_true", help="tiny models, 20 s: a smoke run")
    parser.add_argument("--note", default="", help="e.g. 'machine shared with other jobs'")
    parser.add_argument("--domain-id", type=int, default=96)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    args.duration = args.duration or (20.0 if args.quick else 60.0)
    size = "tiny" if args.quick else "full"
    setup_env(args.domain_id)
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    began = time.monotonic()

    def log(text):
        print(f"[{time.monotonic() - began:4.0f} s] {text}", file=sys.stderr, flush=True)

    args.device = resolve_device_name(args.device)
    dirs = model_dirs(size, args.out)
    frames, source = shifted_frames() if args.frames == "shifted" else load_frames()
    if args.frames == "tum" and not source.startswith("TUM"):
        log(f"note: {source}")
    messages = image_messages(frames)
    results = {"meta": {"size": size, "device": args.device, "precision": args.precision,
                        "duration": args.duration, "frames": source, "matches": args.matches,
                        "note": args.note,
                        "params": "defaults; match_threshold 0.05 (oracle) or 0 (random model); "
                                  "own mode: max_frame_gap 0"}, "runs": []}
    for mode in args.modes.split(","):
        for name in args.configurations.split(","):
            log(f"{name}, {mode} ({size}, {args.device}, {args.precision})")
            try:
                results["runs"].append(run(name, mode, dirs, args, messages, log_dir, log))
            except Exception as exc:  # noqa: BLE001 - report it, go on with the others
                results["runs"].append({"configuration": name, "mode": mode,
                                        "error": f"{type(exc).__name__}: {exc}"})
                log(f"  failed: {exc}")
    tag = ("_quick" if args.quick else "") + ("" if args.matches == "oracle" else "_model")
    (args.out / f"frontend{tag}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / f"frontend{tag}.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
