"""Bags per minute: a serial loop of process_bag vs process_bags on a local Ray instance.

    python bench/bench_process_bags.py [--size tiny|full] [--bags 4] [--frames 8] [--workers 1 2]

Makes --bags bags of --frames 640x480 frames (the shared TUM frames, repeated, or
synthetic texture when ../shared is absent), then times, each as its own process as a
user would run it:

  serial       `process_bag` once per bag, one after the other (default torch threads)
  ray N        `process_bags --workers N` (N tasks at once, cores/N torch threads each),
               Ray start-up and shutdown included

and checks that every process_bags output is byte-identical to the serial one. Prints a
markdown table: wall seconds, bags/min, speed-up. Random-init models (no hub here):
timings are meaningful, keypoint and match counts are not. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TUM_DIR = REPO.parent / "shared" / "data" / "tum_fr3_long_office_household"


def source_frames(count: int) -> list[np.ndarray]:
    paths = sorted(TUM_DIR.glob("*.png")) if TUM_DIR.is_dir() else []
    if paths:
        from PIL import Image
        images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    else:
        import cv2
        rng = np.random.default_rng(0)
        images = [cv2.resize(rng.integers(0, 256, (68, 88, 3), dtype=np.uint8), (704, 544),
                             interpolation=cv2.INTER_CUBIC)[32 + i:512 + i, 32 + 2 * i:672 + 2 * i]
                  for i in range(8)]
    return [np.ascontiguousarray(images[i % len(images)]) for i in range(count)]


def make_bags(root: Path, bags: int, frames: int) -> list[Path]:
    from kp_ros.bags import messages as bag_messages
    from kp_ros.bags import writer as bag_writer
    typestore = bag_messages.kp_ros_typestore()
    images = source_frames(frames)
    paths = []
    for b in range(bags):
        path = root / f"seq_{b:02d}"
        with bag_writer.AtomicBagWriter(path, "sqlite3") as writer:
            connection = writer.add_connection("/camera/image_raw", bag_messages.IMAGE_TYPE, typestore)
            for i, image in enumerate(images):
                stamp = 1_700_000_000_000_000_000 + i * 33_333_333
                header = bag_messages.header_msg(typestore, stamp, "camera")
                msg = bag_messages.image_msg(typestore, image, "rgb8", header)
                writer.write(connection, stamp, typestore.serialize_cdr(msg, bag_messages.IMAGE_TYPE))
        paths.append(path)
    return paths


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds


def raw(path: Path) -> dict:
    from kp_ros.bags import reader as bag_reader
    reader = bag_reader.open_bag(path)
    out = {}
    for connection, log_ns, data in reader.messages():
        out.setdefault(connection.topic, []).append((log_ns, bytes(data)))
    reader.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--bags", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8, help="frames per bag")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)

    from kp_ros.core.random_init import save_random_eloftr, save_random_superpoint
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="kp_ros_bench_bags_") as tmp:
        root = Path(tmp)
        bags = make_bags(root / "data", args.bags, args.frames)
        options = ["--superpoint-model", str(save_random_superpoint(root / "sp", args.size, seed=0)),
                   "--eloftr-model", str(save_random_eloftr(root / "lo", args.size, seed=0)),
                   "--device", "cpu", "--no-progress"]
        rows = []
        # Serial: what `for b in bags; do process_bag ...; done` costs, with the thread count
        # the Ray runs use, so the outputs can be compared byte for byte.
        for workers in args.workers:
            threads = max(1, cores // workers)
            serial_dir = root / f"serial_t{threads}"
            if not serial_dir.exists():
                seconds = sum(timed([sys.executable, "-m", "kp_ros.offline.process_bag_cli", str(bag),
                                     str(serial_dir / bag.name), "--threads", str(threads)] + options)
                              for bag in bags)
                rows.append((f"serial loop of process_bag ({threads} threads)", seconds, None))
            out = root / f"ray_{workers}"
            seconds = timed([sys.executable, "-m", "kp_ros.offline.process_bags", str(root / "data"),
                             "--out", str(out), "--workers", str(workers), "--threads", str(threads)] + options)
            identical = all(raw(out / b.name) == raw(serial_dir / b.name) for b in bags)
            rows.append((f"process_bags --workers {workers} ({threads} threads each)", seconds, identical))
        ray_start = timed([sys.executable, "-c", "import ray, logging; ray.init(num_cpus=1, include_dashboard=False, "
                           "logging_level=logging.WARNING); ray.shutdown()"])

    base = rows[0][1]
    print(f"{args.bags} bags x {args.frames} frames 640x480, {args.size} random-init models, CPU, "
          f"{cores} cores, load average {os.getloadavg()[0]:.1f}\n")
    print("| run | wall s | bags/min | vs first serial loop | outputs identical to serial |\n|---|---:|---:|---:|---|")
    for name, seconds, identical in rows:
        print(f"| {name} | {seconds:.1f} | {args.bags * 60 / seconds:.1f} | {base / seconds:.2f}x | "
              f"{'-' if identical is None else ('yes' if identical else 'NO')} |")
    print(f"\nRay local start + shutdown alone (python -c 'ray.init(); ray.shutdown()'): {ray_start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
