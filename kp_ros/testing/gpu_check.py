"""One prepared check of everything that needs a GPU, in a few minutes, with one report.

    scripts/gpu_check [--out DIR] [--device cuda] [--dry-run] [--timeouts tests=90,live=75,bench=120]

Three parts, each a child process under its own timeout (a hang costs that part, not the
check), run in this order:
  tests  pytest on the CUDA tests (CPU vs CUDA parity with TF32 off, fp16 / bf16 agreement
         bounds, the nodes in-process on CUDA: test/test_cuda_*.py and test_superpoint's CUDA case);
  live   superpoint_node, eloftr_node and track_node as real processes with ``device:=cuda``
         (random-init full-size weights: no hub needed), fed ~30 frames (TUM fr3 when
         ../shared has them, else synthetic) in lockstep: each must come up (its start-up
         line, with the warm-up time on CUDA), publish for every frame, and exit 0 on SIGINT
         with its shutdown line;
  bench  bench/bench_precision.py --device cuda: 640x480 per precision (vs the seed
         pipelines, agreement with fp32, peak GPU memory) and the EfficientLoFTR step at 1080p
         with its peak memory (torch.cuda.max_memory_allocated).
The report (DIR/gpu_check.md, and the same as DIR/gpu_check.json) has each part's result,
numbers and time; its path is the last line printed. Exit code 0 when every part passed,
1 otherwise. Without CUDA it prints one line and exits 0 (nothing to check).

``--dry-run`` runs the same parts end to end on the CPU with tiny models and a few small
frames (the CUDA tests then skip), so the script itself is tested without a GPU
(test/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from kp_ros.testing import node_process
from kp_ros.testing.node_process import IN_SOURCE_TREE, SOURCE_ROOT

NO_CUDA_LINE = "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check"
PARTS = ("tests", "live", "bench")
# Seconds per part on a GPU machine: 285 in all, under the 5 minutes a lent GPU affords
# with the start-up; a part that needs more is reported as timed out.
TIMEOUTS = {"tests": 90.0, "live": 75.0, "bench": 120.0}
DRY_RUN_TIMEOUTS = {"tests": 120.0, "live": 150.0, "bench": 120.0}  # a shared CPU: generous
CUDA_TESTS = ("test/test_cuda_parity.py", "test/test_cuda_nodes.py", "test/test_cuda_devices.py",
              "test/test_superpoint.py::test_cuda_matches_cpu")
TUM_DIR = SOURCE_ROOT.parent / "shared" / "data" / "tum_fr3_long_office_household"
NAMESPACE = "/gpu_check"
LIVE_NODES = ("superpoint_node", "eloftr_node", "track_node")
WARM_UP_RE = re.compile(r"warm-up (\d+) frames in ([0-9.]+) s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check_output"),
                        help="folder for the report, the logs and the benchmark's files")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu: the dry run's device)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the whole check on the CPU with tiny models and small frames (tests the script)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    parser.add_argument("--timeouts", default="", help="seconds per part, e.g. tests=90,live=75,bench=120")
    parser.add_argument("--frames", type=int, default=None, help="frames of the live run (30; dry run 5)")
    parser.add_argument("--part", choices=("live",), help=argparse.SUPPRESS)  # a child process's part
    parser.add_argument("--size", choices=("tiny", "full"), default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run and args.device == "cuda":
        args.device = "cpu"
    size = args.size or ("tiny" if args.dry_run or args.device == "cpu" else "full")
    if args.part == "live":
        result = live_part(args.device, size, args.frames or 30, args.out)
        (args.out / "live.json").write_text(json.dumps(result, indent=1))
        return 0 if result["status"] == "pass" else 1
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(NO_CUDA_LINE)
        return 0
    return run_check(args, size)


# --- the parent: each part under its own timeout, one report ---------------------------------

def run_check(args, size: str) -> int:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    timeouts = dict(DRY_RUN_TIMEOUTS if args.dry_run else TIMEOUTS)
    for item in filter(None, args.timeouts.split(",")):
        name, value = item.split("=")
        timeouts[name.strip()] = float(value)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"gpu_check: unknown part(s) {', '.join(sorted(unknown))}; use {', '.join(PARTS)}")
    env = child_env(args.dry_run)
    began = time.monotonic()
    report = {"device": device_summary(args.device, args.dry_run), "size": size, "parts": {}}
    for name in parts:
        print(f"gpu_check: {name} (timeout {timeouts[name]:.0f} s) ...", flush=True)
        runner = {"tests": tests_part, "live": live_command_part, "bench": bench_part}[name]
        result = runner(args, size, out, env, timeouts[name])
        report["parts"][name] = result
        print(f"gpu_check: {name}: {result['status']} in {result['seconds']:.1f} s: {result['summary']}", flush=True)
    report["seconds"] = time.monotonic() - began
    report["status"] = "pass" if all(p["status"] == "pass" for p in report["parts"].values()) else "fail"
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    path = out / "gpu_check.md"
    path.write_text(markdown(report))
    print(f"gpu_check: {report['status']} in {report['seconds']:.0f} s; report: {path}")
    return 0 if report["status"] == "pass" else 1


def child_env(dry_run: bool) -> dict:
    """This checkout's code first on PYTHONPATH; the dry run hides any GPU, so it takes the
    CPU path on every machine (the CUDA tests skip)."""
    env = node_process.node_env(source_root=SOURCE_ROOT if IN_SOURCE_TREE else None)
    env.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def device_summary(device: str, dry_run: bool) -> dict:
    import torch
    info = {"requested": device, "dry_run": dry_run, "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "cpus": os.cpu_count()}
    for module in ("transformers", "rclpy", "cv2"):  # what the parts need besides torch
        try:
            info[module] = getattr(__import__(module), "__version__", "present")
        except ImportError as exc:
            info[module] = f"missing ({exc})"
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), driver_devices=torch.cuda.device_count())
    return info


def run_child(command: list[str], log_path: Path, env: dict, timeout: float, cwd: Path) -> tuple[int | None, float]:
    """(exit code or None on timeout, seconds). The child leads a process group of its own,
    so a timeout ends it with everything it started (the live part's nodes)."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
            for sig in (signal.SIGINT, signal.SIGKILL):  # SIGINT first: the nodes shut down cleanly
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            process.wait()
    return code, time.monotonic() - started


def part_result(status: str, seconds: float, summary: str, log: Path, **details) -> dict:
    return {"status": status, "seconds": round(seconds, 1), "summary": summary, "log": str(log), **details}


def tests_part(args, size, out: Path, env: dict, timeout: float) -> dict:
    log, junit = out / "logs" / "tests.log", out / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml={junit}",
               *CUDA_TESTS]
    if not (SOURCE_ROOT / "test").is_dir():
        return part_result("fail", 0.0, "no test/ folder (run from a source checkout)", log)
    if junit.exists():
        junit.unlink()
    code, seconds = run_child(command, log, env, timeout, SOURCE_ROOT)
    counts, failed = junit_counts(junit)
    text = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped")
    if code is None:
        return part_result("timeout", seconds, f"timed out after {timeout:.0f} s; {text}", log, counts=counts)
    # On a GPU every test runs: a skip there means a test could not see the device.
    passed = code == 0 and counts["failed"] == counts["errors"] == 0 and (
        args.dry_run or (counts["passed"] > 0 and counts["skipped"] == 0))
    if failed:
        text += "; failing: " + ", ".join(failed[:10])
    return part_result("pass" if passed else "fail", seconds, text, log, counts=counts, failing=failed,
                       skip_reasons=skip_reasons(junit))


def junit_counts(path: Path) -> tuple[dict, list[str]]:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed = []
    if not path.exists():
        return counts, failed
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failed


def skip_reasons(path: Path) -> list[str]:
    if not path.exists():
        return []
    return sorted({case.find("skipped").get("message", "") for case in ElementTree.parse(path).getroot().iter(
        "testcase") if case.find("skipped") is not None})


def live_command_part(args, size, out: Path, env: dict, timeout: float) -> dict:
    log, result_path = out / "logs" / "live.log", out / "live.json"
    if result_path.exists():
        result_path.unlink()
    frames = args.frames or (5 if args.dry_run else 30)
    command = [sys.executable, "-m", "kp_ros.testing.gpu_check", "--part", "live", "--device", args.device,
               "--size", size, "--frames", str(frames), "--out", str(out)]
    code, seconds = run_child(command, log, env, timeout, SOURCE_ROOT if IN_SOURCE_TREE else out)
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if code is None:
        return part_result("timeout", seconds, f"timed out after {timeout:.0f} s", log, **result)
    if not result:
        return part_result("fail", seconds, f"exited with code {code} and no result (see the log)", log)
    result.pop("seconds", None)
    return part_result(result.pop("status"), seconds, result.pop("summary"), log, **result)


def bench_part(args, size, out: Path, env: dict, timeout: float) -> dict:
    log, bench_out = out / "logs" / "bench.log", out / "bench"
    script = SOURCE_ROOT / "bench" / "bench_precision.py"
    if not script.exists():
        return part_result("fail", 0.0, "no bench/bench_precision.py (run from a source checkout)", log)
    if args.dry_run:
        options = ["--size", "tiny", "--runs", "1", "--precisions", "fp32", "--frame-size", "96x128",
                   "--resize", "native", "--resolutions", "64x96,96x128", "--no-seed", "--ceiling-seconds", "0.05",
                   "--max-call-seconds", "20"]
    else:
        # GPU kernels take milliseconds: half a second per ceiling kernel is plenty.
        options = ["--size", size, "--runs", "3", "--resolutions", "480x640,1080x1920", "--ceiling-seconds", "0.5"]
    command = [sys.executable, str(script), "--device", args.device, "--scaling-models", "eloftr",
               "--out", str(bench_out), *options]
    if (bench_out / "precision.json").exists():
        (bench_out / "precision.json").unlink()
    code, seconds = run_child(command, log, env, timeout, SOURCE_ROOT)
    path = bench_out / "precision.json"
    if code is None:
        return part_result("timeout", seconds, f"timed out after {timeout:.0f} s", log)
    if code != 0 or not path.exists():
        return part_result("fail", seconds, f"bench_precision exited with code {code} (see the log)", log)
    results = json.loads(path.read_text())
    paths = {key: {k: value.get(k) for k in ("ms", "peak_mib", "slow")} |
             ({"agreement": value["agreement"]} if "agreement" in value else {})
             for key, value in results["paths"].items()}
    largest = {}
    for key, by_size in results.get("scaling", {}).items():
        name, entry = max(by_size.items(), key=lambda item: int(item[0].split("x")[0]) * int(item[0].split("x")[1]))
        largest[key] = {"size": name, **{k: entry.get(k) for k in ("ms", "peak_mib", "slow")}}
    summary = "; ".join(f"{key} {value['ms']:.1f} ms" + peak(value.get("peak_mib")) for key, value in paths.items()
                        if not key.endswith("/seed"))
    summary += "".join(f"; {key} at {value['size']} {value['ms']:.1f} ms" + peak(value.get("peak_mib"))
                       for key, value in largest.items())
    return part_result("pass", seconds, summary, log, paths=paths, largest=largest, frame_size=results["frame_size"],
                       table=str(bench_out / "precision.md"))


def peak(mib) -> str:
    return "" if mib is None else f" (peak {mib:.0f} MiB)"


def markdown(report: dict) -> str:
    device = report["device"]
    what = (f"{device.get('name')} (sm {device.get('capability')}, {device.get('memory_gib')} GiB), CUDA "
            f"{device.get('cuda')}, cuDNN {device.get('cudnn')}" if "name" in device else
            f"{device['requested']} (dry run: tiny models, small frames; the CUDA tests skip)")
    lines = [f"# gpu_check: {report['status'].upper()} in {report['seconds']:.0f} s", "",
             f"Device: {what}; torch {device['torch']}, Python {device['python']}, {device['cpus']} CPUs, "
             f"host {device['host']}; transformers {device.get('transformers')}, rclpy {device.get('rclpy')}, "
             f"OpenCV {device.get('cv2')}. Models: {report['size']} random-init.", "",
             "| part | result | seconds | summary |", "|---|---|---:|---|"]
    for name, part in report["parts"].items():
        lines.append(f"| {name} | {part['status']} | {part['seconds']:.1f} | {part['summary']} |")
    for name, part in report["parts"].items():
        lines += ["", f"## {name}", "", f"Result: **{part['status']}** in {part['seconds']:.1f} s. "
                  f"{part['summary']}", "", f"Log: `{part['log']}`"]
        if name == "tests" and part.get("skip_reasons"):
            lines += ["", "Skip reasons: " + "; ".join(part["skip_reasons"])]
        if name == "live" and "nodes" in part:
            lines += ["", "| node | started | warm-up s | outputs | exit code | shutdown line |",
                      "|---|---|---:|---:|---:|---|"]
            for node, entry in part["nodes"].items():
                warm = "-" if entry.get("warm_up_s") is None else f"{entry['warm_up_s']:.2f}"
                lines.append(f"| {node} | {entry.get('started')} | {warm} | {entry.get('outputs')} | "
                             f"{entry.get('exit_code')} | {entry.get('shutdown') or '-'} |")
            if part.get("latency_ms"):
                lines += ["", "Lockstep latency, publish -> output (ms, median / max): " + "; ".join(
                    f"{k} {v['median']:.1f} / {v['max']:.1f}" for k, v in part["latency_ms"].items() if v)]
        if name == "bench" and "paths" in part:
            height, width = part["frame_size"].split("x")
            lines += ["", f"| path ({width}x{height}) | ms per call | peak MiB | agreement with fp32 |",
                      "|---|---:|---:|---|"]
            for key, value in part["paths"].items():
                lines.append(f"| {key} | {value['ms']:.1f} | {fmt(value.get('peak_mib'))} | "
                             f"{agreement_text(value.get('agreement'))} |")
            lines += ["", "| path, largest size | size | ms per step | peak MiB |", "|---|---|---:|---:|"]
            for key, value in part["largest"].items():
                lines.append(f"| {key} | {value['size']} | {value['ms']:.1f} | {fmt(value.get('peak_mib'))} |")
            lines += ["", f"Full tables: `{part['table']}`"]
    return "\n".join(lines) + "\n"


def fmt(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def agreement_text(agreement) -> str:
    if not agreement:
        return ""
    if "iou" in agreement:
        return f"mutual-NN IoU {agreement['iou']:.3f}, counts {agreement['count']}"
    return f"recall {agreement['recall']:.3f}, cosine median {agreement['cosine_median']:.5f}"


# --- the live part (a child process): the three nodes over DDS -------------------------------

def live_frames(count: int, small: bool) -> tuple[list, str]:
    """RGB uint8 frames in camera order: TUM fr3 (ping-pong, so consecutive frames stay
    neighbours) or a synthetic texture moving 8 px per frame (random weights match exact
    8 px shifts)."""
    import numpy as np
    paths = sorted(TUM_DIR.glob("*.png")) if TUM_DIR.is_dir() and not small else []
    if paths:
        from PIL import Image
        images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        cycle = images + images[-2:0:-1]
        return [cycle[i % len(cycle)] for i in range(count)], f"TUM fr3 640x480 ({len(paths)} frames, ping-pong)"
    import cv2
    height, width = (120, 160) if small else (480, 640)
    texture = np.random.default_rng(0).integers(0, 256, (height // 8 + 2, (width + 8 * count) // 8 + 2, 3),
                                                dtype=np.uint8)
    texture = cv2.resize(texture, (texture.shape[1] * 8, texture.shape[0] * 8), interpolation=cv2.INTER_CUBIC)
    frames = [np.ascontiguousarray(texture[8:8 + height, 8 + 8 * i:8 + 8 * i + width]) for i in range(count)]
    return frames, f"synthetic {width}x{height}, 8 px per frame"


def live_part(device: str, size: str, count: int, out: Path) -> dict:
    """Start the three nodes, publish ``count`` frames one at a time (each waits for its
    Keypoints and, after the first, its Matches), then SIGINT them; a result dict."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    from kp_ros.core.random_init import save_random_eloftr, save_random_superpoint
    models = {}
    for node, save in (("superpoint_node", save_random_superpoint), ("eloftr_node", save_random_eloftr)):
        target = out / "models" / size / node
        if not (target / "config.json").exists():
            save(target, size, seed=0)
        models[node] = target
    frames, source = live_frames(count, small=size == "tiny")
    env = node_process.node_env(source_root=SOURCE_ROOT if IN_SOURCE_TREE else None)
    image_topic = f"{NAMESPACE}/image_raw"
    params = {
        "superpoint_node": {"model": models["superpoint_node"], "device": device, "reliable_input": "reliable"},
        "eloftr_node": {"model": models["eloftr_node"], "device": device, "reliable_input": "reliable",
                        "match_threshold": 0.0},
        # Matches wait for their Keypoints' frame: room for a slow first step (the dry run's CPU).
        "track_node": {"match_timeout": 10.0},
    }
    params_file = SOURCE_ROOT / "config" / "matcher.yaml"
    if not params_file.exists():
        from kp_ros.core.package_files import package_file
        params_file = package_file("config/matcher.yaml")
    logs = {node: out / "logs" / f"live_{node}.log" for node in LIVE_NODES}
    processes = {node: node_process.start_node(node, logs[node], params=params[node], params_file=params_file,
                                               remaps={"image": image_topic}, namespace=NAMESPACE, env=env)
                 for node in LIVE_NODES}
    client, problem, latencies = None, "", {}
    try:
        client = LiveClient(image_topic)
        problem = client.wait_ready(processes, timeout=60.0)
        if not problem:
            problem, latencies = client.lockstep(frames, timeout=30.0)
        if not problem:
            client.wait_for(lambda: len(client.got["tracks"]) >= count, 10.0)
    except Exception as exc:  # noqa: BLE001 - the report says what failed; the nodes still stop below
        problem = f"{type(exc).__name__}: {exc}"
    finally:
        stopped = dict(zip(processes, node_process.stop_nodes(processes.values(), timeout=30.0)))
        if client is not None:
            time.sleep(0.5)  # track_node's last Tracks, flushed at its shutdown
            client.close()
    counts = {key: len(value) for key, value in (client.got.items() if client else ())}
    nodes = {}
    for node, (code, log) in stopped.items():
        warm = WARM_UP_RE.search(log)
        output = {"superpoint_node": "keypoints", "eloftr_node": "matches", "track_node": "tracks"}[node]
        nodes[node] = {"started": startup_line(node, log) is not None, "startup_line": startup_line(node, log),
                       "warm_up_s": float(warm.group(2)) if warm else None, "outputs": counts.get(output, 0),
                       "exit_code": code, "shutdown": node_process.shutdown_summary(log),
                       "traceback": "Traceback" in log, "log": str(logs[node])}
    expected = {"superpoint_node": count, "eloftr_node": count - 1, "track_node": count}
    faults = [problem] if problem else []
    for node, entry in nodes.items():
        if not entry["started"]:
            faults.append(f"{node}: no start-up line")
        if device.startswith("cuda") and node != "track_node" and entry["warm_up_s"] is None:
            faults.append(f"{node}: no warm-up in its start-up line")
        if entry["outputs"] < expected[node]:
            faults.append(f"{node}: {entry['outputs']} outputs for {count} frames (expected {expected[node]})")
        if entry["exit_code"] != 0 or entry["shutdown"] is None or entry["traceback"]:
            faults.append(f"{node}: exit code {entry['exit_code']}"
                          + (", no shutdown line" if entry["shutdown"] is None else "")
                          + (", a traceback in its log" if entry["traceback"] else ""))
    summary = (f"{count} frames ({source}) on {device}: keypoints {counts.get('keypoints', 0)}, "
               f"matches {counts.get('matches', 0)}, tracks {counts.get('tracks', 0)}; "
               + ("all three nodes started, published and exited 0" if not faults else "; ".join(faults)))
    return {"status": "fail" if faults else "pass", "summary": summary, "seconds": time.monotonic() - started,
            "frames": count, "source": source, "nodes": nodes, "latency_ms": latencies}


def startup_line(node: str, log: str) -> str | None:
    """The line a node logs once it is up: the feature nodes name their input topic
    ('... on /ns/image_raw (QoS)'), track_node its inputs ('tracks from ...')."""
    marker = "tracks from " if node == "track_node" else f" on {NAMESPACE}/image_raw"
    return next((line.strip() for line in log.splitlines() if marker in line), None)


class LiveClient:
    """The camera and the listener: publishes images, keeps every Keypoints / Matches /
    Tracks by stamp (with its arrival time); a thread spins."""

    def __init__(self, image_topic: str):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import Image

        from kp_ros.msg import Keypoints, Matches, Tracks
        from kp_ros.ros.qos import output_qos

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("gpu_check_client", context=self.context)
        self.pub = self.node.create_publisher(Image, image_topic, output_qos())
        self.got = {"keypoints": {}, "matches": {}, "tracks": {}}
        for kind, msg_type in (("keypoints", Keypoints), ("matches", Matches), ("tracks", Tracks)):
            self.node.create_subscription(msg_type, f"{NAMESPACE}/{kind}", self._keep(kind), output_qos())
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._running = True
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while self._running and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def _keep(self, kind: str):
        store = self.got[kind]
        return lambda msg: store.__setitem__((msg.header.stamp.sec, msg.header.stamp.nanosec), time.monotonic())

    @staticmethod
    def wait_for(predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def wait_ready(self, processes: dict, timeout: float) -> str:
        """'' once both feature nodes subscribe to the images and track_node to the
        keypoints and matches (each topic: track_node's subscription and ours)."""
        def ready():
            return (self.pub.get_subscription_count() >= 2
                    and self.node.count_subscribers(f"{NAMESPACE}/keypoints") >= 2
                    and self.node.count_subscribers(f"{NAMESPACE}/matches") >= 2)
        deadline = time.monotonic() + timeout
        while not ready():
            exited = [f"{name} exited with code {p.returncode}" for name, p in processes.items()
                      if p.poll() is not None]
            if exited:
                return "; ".join(exited)
            if time.monotonic() > deadline:
                return f"the nodes did not subscribe within {timeout:.0f} s"
            time.sleep(0.1)
        return ""

    def lockstep(self, frames: list, timeout: float) -> tuple[str, dict]:
        """Publish each frame once the previous one's outputs came: ('' or what was
        missing, {output: latency percentiles in ms})."""
        from builtin_interfaces.msg import Time
        import numpy as np

        from kp_ros.ros.conversions import array_to_image_msg
        latencies = {"keypoints": [], "matches": []}
        for i, frame in enumerate(frames):
            msg = array_to_image_msg(frame, "rgb8")
            stamp_ns = 100 * 10 ** 9 + i * 10 ** 9 // 30  # a 30 Hz camera
            msg.header.stamp = Time(sec=stamp_ns // 10 ** 9, nanosec=stamp_ns % 10 ** 9)
            msg.header.frame_id = "camera"
            key = (msg.header.stamp.sec, msg.header.stamp.nanosec)
            wanted = ["keypoints"] + (["matches"] if i else [])
            sent = time.monotonic()
            self.pub.publish(msg)
            if not self.wait_for(lambda: all(key in self.got[k] for k in wanted), timeout):
                missing = [k for k in wanted if key not in self.got[k]]
                return f"frame {i}: no {', '.join(missing)} within {timeout:.0f} s", {}
            for kind in wanted:
                latencies[kind].append(1e3 * (self.got[kind][key] - sent))
        return "", {kind: {"median": float(np.median(v)), "max": float(np.max(v))} if v else None
                    for kind, v in latencies.items()}

    def close(self) -> None:
        import rclpy
        self._running = False
        self._thread.join(5)
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


if __name__ == "__main__":
    raise SystemExit(main())
