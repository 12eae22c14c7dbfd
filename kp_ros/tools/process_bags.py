"""process_bags: many bags through process_bag's pipeline in parallel, on Ray.

Each bag (INPUT: bags, or folders searched for bags) becomes one Ray task that runs
exactly what `process_bag BAG DIR/<bag name>` runs, with the same options (flags and
--params-file), so every output bag's messages are byte-identical to process_bag's on
that bag with the same options and --threads. Writes DIR/<bag name> per bag and
DIR/summary.json + DIR/summary.csv (per bag: status, frames, keypoints/frame,
matches/frame, resets, rejected frames, seconds, the worker's host).

By default a local Ray instance runs --workers tasks at once (one per GPU when CUDA is
used, else one per core as bags and memory allow, each with an equal share of the
cores as torch threads: --threads); --address auto|HOST:PORT joins a running cluster
instead (bags and DIR on storage every node sees).

A bad bag (corrupt, missing topic) is reported and the others finish; a worker that
dies is retried by Ray; a rerun skips bags whose output exists (outputs are written
under a temporary name and renamed when complete), --overwrite redoes them.

Exit codes: 0 all done, 1 some bag failed (named on stderr) or bad option, 130 interrupted.

    process_bags datasets/tum/ --out features/ --params-file my.yaml
    process_bags a.bag b.mcap --out features/ --address auto      # on a Ray cluster
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from kp_ros.core.bag_io import BagError, image_connections, open_bag
from kp_ros.tools import process_bag as pb

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
BAG_SUFFIXES = (".db3", ".mcap")
INSTALL_HINT = ("process_bags needs Ray, an optional dependency of kp_ros: "
                "pip install 'kp_ros[cluster]' (or pip install 'ray>=2.60')")
CSV_FIELDS = ("bag", "status", "frames", "processed", "keypoints_per_frame", "matches_per_frame",
              "resets", "rejected", "seconds", "host", "error")
GB_PER_TASK = 2.0  # peak RSS of both full-size models on CPU (~1.9 GB, README)
CANCEL_GRACE_S = 30.0  # cancelled tasks get this long to delete their partial output


# --- finding bags --------------------------------------------------------------------

def is_bag(path: Path) -> bool:
    return (path.is_dir() and (path / "metadata.yaml").is_file()) or \
        (path.is_file() and path.suffix in BAG_SUFFIXES)


def find_bags(inputs, exclude: Path | None = None) -> list[Path]:
    """Bags named in ``inputs``, and every bag below the folders among them (a bag
    directory is not searched further; hidden entries, e.g. partial outputs, and
    ``exclude`` are skipped). BagError for an input that is neither."""
    exclude = exclude.resolve() if exclude else None
    found = []
    for entry in map(Path, inputs):
        if is_bag(entry):
            found.append(entry)
        elif entry.is_dir():
            for root, dirs, files in os.walk(entry):
                here = Path(root)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and (here / d).resolve() != exclude)
                if (here / "metadata.yaml").is_file():
                    found.append(here)
                    dirs.clear()
                    continue
                found += [here / f for f in sorted(files)
                          if f.endswith(BAG_SUFFIXES) and not f.startswith(".")]
        else:
            raise BagError(f"{str(entry)!r} is neither a bag nor a folder")
    return found


def bag_name(bag: Path) -> str:
    """The output name: the bag directory's name, or a bag file's name without suffix."""
    return bag.stem if bag.is_file() else bag.resolve().name


def remove_partials(out_dir: Path, names) -> None:
    """Partial outputs (AtomicBagWriter's hidden temp directories) of ``names``, left by a
    worker that was killed before it could delete them."""
    for name in names:
        for stale in out_dir.glob(f".{name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)


def count_frames(bag: Path, topic: str | None) -> int:
    """Frames of the bag's image topic (for the progress bar); 0 when the bag is unreadable
    (its task reports why)."""
    try:
        reader = open_bag(bag)
    except BagError:
        return 0
    try:
        return sum(c.msgcount for c in image_connections(reader, topic)[2])
    except BagError:
        return 0
    finally:
        reader.close()


# --- the Ray task --------------------------------------------------------------------

def summary_record(summary: pb.Summary) -> dict:
    def per(total, msgs):
        return round(total / msgs, 2) if msgs else 0.0
    return {"frames": summary.frames, "processed": summary.processed,
            "keypoints_per_frame": per(summary.keypoints_total, summary.keypoints_msgs),
            "matches_per_frame": per(summary.matches_total, summary.matches_msgs),
            "resets": sum(summary.resets.values()), "rejected": sum(summary.rejected.values()),
            "reasons": {summary.examples[k]: n for k, n in (summary.resets + summary.rejected).items()}}


def bag_task(args, bag: str, output: str, options: tuple, progress=None, name: str = "") -> dict:
    """One bag, in a Ray worker: process_bag's run_one, its outcome as a JSON-able dict.
    A bad bag is a result ("failed", with the reason), not an exception, so the driver
    reports it and the other bags go on; Ctrl-C (ray.cancel) propagates, and the atomic
    writer deletes the partial output on the way out."""
    from kp_ros.core.model_loading import ModelUnavailableError

    record = {"bag": name, "input": bag, "output": output, "host": socket.gethostname(),
              "pid": os.getpid()}
    last = [0.0]

    def on_frame(frames: int) -> None:
        now = time.monotonic()
        if progress is not None and now - last[0] >= 0.5:  # ~2 updates/s per task
            last[0] = now
            progress.set.remote(name, frames)

    def log(text: str) -> None:
        print(f"{name}: {text}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    try:
        summary = pb.run_one(args, bag, output, *options, progress=False, on_frame=on_frame, log=log)
        record.update(status="done", **summary_record(summary))
        if progress is not None:
            progress.set.remote(name, summary.frames)
    except ModelUnavailableError as err:
        record.update(status="failed", error=f"{err} (or pass --random-init-fallback)")
    except (BagError, ValueError) as err:
        record.update(status="failed", error=str(err))
    except Exception as err:  # noqa: BLE001 - a model failure is this bag's, not the run's
        record.update(status="failed", error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


class Progress:
    """A Ray actor: frames read so far per bag (set, not added, so a retried task does
    not count its frames twice)."""

    def __init__(self):
        self.frames = {}

    def set(self, name: str, frames: int) -> None:
        self.frames[name] = frames

    def total(self) -> int:
        return sum(self.frames.values())


# --- Ray -----------------------------------------------------------------------------

def import_ray():
    try:
        import ray
    except ImportError:
        return None
    return ray


def start_local_ray(num_cpus: int, num_gpus: int = 0, temp_dir: str | None = None,
                    object_store_mb: int = 128):
    """A local Ray instance sized for this run: ``num_cpus`` logical CPUs (so the tasks'
    num_cpus requests decide how many run at once), no dashboard, a small object store
    (results are small dicts), temp files and logs outside the working directory."""
    import logging

    import ray
    # The workers import kp_ros from where this driver found it (a checkout or an install).
    source = str(Path(pb.__file__).resolve().parents[2])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if source not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([source] + paths)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                    object_store_memory=object_store_mb * 1024 * 1024, _temp_dir=temp_dir,
                    logging_level=logging.WARNING, log_to_driver=True)


def wants_cuda(detector_kwargs: dict, matcher_kwargs: dict, gpus_available: int) -> bool:
    devices = {str(kw.get("device", "auto")) for kw in (detector_kwargs, matcher_kwargs)}
    return any(d.startswith("cuda") for d in devices) or ("auto" in devices and gpus_available > 0)


def available_memory_gb() -> float:
    try:
        import psutil  # a dependency of Ray
        return psutil.virtual_memory().available / 2**30
    except ImportError:
        return float("inf")


def plan_resources(args, cuda: bool, gpus: int, cpus: int, bags: int,
                   memory_gb: float = float("inf"), cluster: bool = False) -> tuple[int, int, float]:
    """(tasks at once, torch threads per task, GPUs per task). On a cluster Ray's free
    resources decide how many run; each task asks for --threads CPUs (default 2)."""
    gpus_per_task = (args.gpus_per_task or 1.0) if cuda else 0.0
    if cluster:
        return args.workers or bags, args.threads or 2, gpus_per_task
    if cuda:
        workers = args.workers or max(1, min(gpus, bags))
    else:
        # One task per core by default: measured faster than fewer tasks with more threads
        # (bench/bench_process_bags.py), capped by memory (one model copy per task).
        by_memory = int(memory_gb // GB_PER_TASK) if memory_gb < float("inf") else bags
        workers = args.workers or max(1, min(cpus // (args.threads or 1), bags, by_memory))
    return workers, args.threads or max(1, cpus // workers), gpus_per_task


# --- command line --------------------------------------------------------------------

def build_parser():
    parser = pb.build_parser("process_bags", __doc__, positionals=False)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="bags, or folders searched for bags")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/<bag name>")
    cluster = parser.add_argument_group("Ray")
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="tasks at once (default: one per GPU when CUDA is used, else one per "
                              "core, ~2 GB of free memory each; on a cluster: as many as its "
                              "resources allow)")
    cluster.add_argument("--address", metavar="auto|HOST:PORT",
                         help="join a running Ray cluster instead of starting a local instance")
    cluster.add_argument("--gpus-per-task", type=float, metavar="G",
                         help="GPUs each task asks Ray for when CUDA is used (default 1)")
    return parser


def fail(text: str, code: int = EXIT_FAILED) -> int:
    print(f"process_bags: error: {text}", file=sys.stderr)
    return code


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ray = import_ray()
    if ray is None:
        return fail(INSTALL_HINT)
    if not (args.detector or args.matcher):
        return fail("--no-detector and --no-matcher: nothing to do")
    if args.workers is not None and args.workers < 1:
        return fail("--workers must be at least 1")
    out_dir = Path(args.out)
    try:
        options = pb.resolve_options(args)
        bags = find_bags(args.inputs, exclude=out_dir)
    except (BagError, ValueError) as err:
        return fail(str(err))
    if not bags:
        return fail(f"no bags found in {', '.join(args.inputs)}")
    names = [bag_name(b) for b in bags]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        return fail("several bags would write the same output: " + ", ".join(
            f"{n} ({', '.join(str(b) for b, m in zip(bags, names) if m == n)})" for n in clashes))
    todo = [(b, n) for b, n in zip(bags, names) if args.overwrite or not (out_dir / n).exists()]
    skipped = [n for b, n in zip(bags, names) if (b, n) not in todo]
    for name in skipped:
        print(f"process_bags: {name}: skipped, {out_dir / name} exists (--overwrite redoes it)",
              file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)

    previous = signal.signal(signal.SIGTERM, _interrupt)
    started_ray = False
    records = {}
    try:
        if todo:
            remove_partials(out_dir, [n for _, n in todo])
            if not ray.is_initialized():
                if args.address:
                    try:
                        ray.init(address=args.address, log_to_driver=True)
                    except Exception as err:  # noqa: BLE001 - ConnectionError, AuthenticationError, ...
                        return fail(f"cannot join the Ray cluster at {args.address}: {err} (started "
                                    f"with `ray start --head` there? RAY_AUTH_MODE=token and the "
                                    f"cluster's token here?)")
                else:
                    import torch
                    gpus = torch.cuda.device_count()
                    workers, threads, per_task = plan_resources(
                        args, wants_cuda(*options[:2], gpus), gpus, os.cpu_count() or 1,
                        len(todo), available_memory_gb())
                    start_local_ray(workers * threads, gpus if per_task else 0)
                started_ray = True
            _run(ray, args, options, out_dir, todo, records)
    except KeyboardInterrupt:
        write_summary(out_dir, records, skipped)  # the bags finished so far
        print("process_bags: interrupted; bags not finished have no output", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if started_ray:
            ray.shutdown()
        if todo:
            remove_partials(out_dir, [n for _, n in todo])  # a worker killed by the shutdown
        signal.signal(signal.SIGTERM, previous)

    summary = write_summary(out_dir, records, skipped)
    print(summary_table(summary))
    failed = [r for r in records.values() if r["status"] == "failed"]
    if failed:
        return fail(f"{len(failed)} of {len(bags)} bags failed: " + "; ".join(
            f"{r['bag']} ({r['input']}): {r['error'].splitlines()[0] if r['error'] else '?'}"
            for r in failed))
    return EXIT_OK


def _run(ray, args, options, out_dir: Path, todo, records: dict) -> None:
    """Submit one task per bag (at most --workers in flight), feed one progress bar, and
    collect the records into ``records``; on Ctrl-C cancel the tasks and wait for their clean-up."""
    from tqdm import tqdm

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", os.cpu_count() or 1))
    cuda = wants_cuda(*options[:2], gpus)
    workers, threads, gpus_per_task = plan_resources(
        args, cuda, gpus, cpus, len(todo), available_memory_gb(), cluster=bool(args.address))
    task_args = argparse.Namespace(**{**vars(args), "threads": threads})
    task = ray.remote(bag_task).options(num_cpus=threads, num_gpus=gpus_per_task, max_retries=2,
                                        retry_exceptions=False)
    progress = ray.remote(num_cpus=0)(Progress).remote()
    total = sum(count_frames(bag, args.topic) for bag, _ in todo)
    print(f"process_bags: {len(todo)} bags, {total} frames; {workers} at once, {threads} torch "
          f"threads{f', {gpus_per_task:g} GPU' if gpus_per_task else ''} each", file=sys.stderr)
    queue, running = list(todo), {}
    bar = tqdm(total=total, unit="frame", disable=not args.progress, dynamic_ncols=True,
               desc="process_bags", file=sys.stderr)
    try:
        while queue or running:
            while queue and len(running) < workers:
                bag, name = queue.pop(0)
                ref = task.remote(task_args, str(bag), str(out_dir / name), options, progress, name)
                running[ref] = (bag, name)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                bag, name = running.pop(ref)
                try:
                    records[name] = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died more than max_retries times
                    records[name] = {"bag": name, "input": str(bag), "output": str(out_dir / name),
                                     "status": "failed", "error": f"{type(err).__name__}: {err}"}
                status = records[name]["status"]
                bar.write(f"process_bags: {name}: {status}" + (
                    f" ({records[name]['error'].splitlines()[0]})" if status == "failed" else
                    f", {records[name]['frames']} frames in {records[name]['seconds']:.1f} s"
                    f" on {records[name]['host']}"), file=sys.stderr)
            bar.update(ray.get(progress.total.remote()) - bar.n)
    except KeyboardInterrupt:
        for ref in running:
            ray.cancel(ref)  # KeyboardInterrupt in the task: its atomic writer cleans up
        ray.wait(list(running), num_returns=len(running), timeout=CANCEL_GRACE_S)
        raise
    finally:
        bar.close()


def write_summary(out_dir: Path, records: dict, skipped) -> dict:
    """DIR/summary.json (+ .csv): every bag of DIR, this run's records over the previous
    runs' (a skipped bag keeps its last record, marked skipped), and this run's counts.
    Written under a temporary name and renamed, like the bags. Returns this run's part."""
    path = out_dir / "summary.json"
    try:
        known = {r["bag"]: r for r in json.loads(path.read_text()).get("bags", [])}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        known = {}
    this_run = {name: {**known.get(name, {"bag": name}), "status": "skipped"} for name in skipped}
    this_run.update(records)
    known.update(this_run)
    counts = {status: sum(r["status"] == status for r in this_run.values())
              for status in ("done", "skipped", "failed")}
    summary = {"bags": [known[name] for name in sorted(known)], "last_run": counts}
    tmp = out_dir / ".summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, path)
    tmp = out_dir / ".summary.csv.partial"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for record in summary["bags"]:
            writer.writerow({k: record.get(k, "") for k in CSV_FIELDS})
    os.replace(tmp, out_dir / "summary.csv")
    return {"bags": [this_run[name] for name in sorted(this_run)], **counts}


def summary_table(summary: dict) -> str:
    lines = [f"process_bags: {summary['done']} done, {summary['skipped']} skipped, "
             f"{summary['failed']} failed",
             f"  {'bag':<28} {'status':<8} {'frames':>6} {'kp/frame':>9} {'m/frame':>8} "
             f"{'resets':>6} {'rejected':>8} {'seconds':>8}  host"]
    for r in summary["bags"]:
        lines.append(f"  {r['bag'][:28]:<28} {r['status']:<8} {r.get('frames', ''):>6} "
                     f"{r.get('keypoints_per_frame', ''):>9} {r.get('matches_per_frame', ''):>8} "
                     f"{r.get('resets', ''):>6} {r.get('rejected', ''):>8} "
                     f"{r.get('seconds', ''):>8}  {r.get('host', '')}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
