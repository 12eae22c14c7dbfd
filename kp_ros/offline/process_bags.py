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
import os
import signal
import sys
from pathlib import Path

from kp_ros.core.signals import raise_interrupt
from kp_ros.offline import process_bag_cli as process_bag
from kp_ros.bags.finding import bag_name, count_frames, find_bags, remove_partials
from kp_ros.bags.reader import BagError
from kp_ros.offline.options import resolve_options
from kp_ros.offline.ray_tasks import (Progress, available_memory_gb, bag_task, import_ray,
                                      plan_resources, start_local_ray, wants_cuda)
from kp_ros.offline.batch_summary import summary_table, write_summary

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
INSTALL_HINT = ("process_bags needs Ray, an optional dependency of kp_ros: "
                "pip install 'kp_ros[cluster]' (or pip install 'ray>=2.60')")
CANCEL_GRACE_S = 30.0  # cancelled tasks get this long to delete their partial output


def build_parser():
    parser = process_bag.build_parser("process_bags", __doc__, positionals=False)
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


def _plan(args, out_dir: Path) -> tuple[list, list, list]:
    """(bags, [(bag, output name)] to do, names skipped); ValueError when there is nothing
    to do or two bags would write one output."""
    bags = find_bags(args.inputs, exclude=out_dir)
    if not bags:
        raise ValueError(f"no bags found in {', '.join(args.inputs)}")
    names = [bag_name(b) for b in bags]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError("several bags would write the same output: " + ", ".join(
            f"{n} ({', '.join(str(b) for b, m in zip(bags, names) if m == n)})" for n in clashes))
    todo = [(b, n) for b, n in zip(bags, names) if args.overwrite or not (out_dir / n).exists()]
    skipped = [n for b, n in zip(bags, names) if (b, n) not in todo]
    for name in skipped:
        print(f"process_bags: {name}: skipped, {out_dir / name} exists (--overwrite redoes it)",
              file=sys.stderr)
    return bags, todo, skipped


def _start_ray(ray, args, options, bags: int) -> str | None:
    """Join ``--address`` or start a local Ray sized for the bags; the problem, or None."""
    if args.address:
        try:
            ray.init(address=args.address, log_to_driver=True)
        except Exception as err:  # noqa: BLE001 - ConnectionError, AuthenticationError, ...
            return (f"cannot join the Ray cluster at {args.address}: {err} (started with "
                    f"`ray start --head` there? RAY_AUTH_MODE=token and the cluster's token here?)")
        return None
    import torch
    gpus = torch.cuda.device_count()
    workers, threads, per_task = plan_resources(args, wants_cuda(*options[:2], gpus), gpus,
                                                os.cpu_count() or 1, bags, available_memory_gb())
    start_local_ray(workers * threads, gpus if per_task else 0)
    return None


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
        options = resolve_options(args)
        bags, todo, skipped = _plan(args, out_dir)
    except (BagError, ValueError) as err:
        return fail(str(err))
    out_dir.mkdir(parents=True, exist_ok=True)

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    started_ray = interrupted = False
    records = {}
    try:
        if todo:
            remove_partials(out_dir, [n for _, n in todo])
            if not ray.is_initialized():
                problem = _start_ray(ray, args, options, len(todo))
                if problem:
                    return fail(problem)
                started_ray = True
            _run(ray, args, options, out_dir, todo, records)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        interrupted = _shut_down(ray if started_ray else None, out_dir, todo) or interrupted
        signal.signal(signal.SIGTERM, previous)
    if interrupted and not all(name in records for _, name in todo):
        write_summary(out_dir, records, skipped)  # the bags finished so far
        print("process_bags: interrupted; bags not finished have no output", file=sys.stderr)
        return EXIT_INTERRUPTED
    if interrupted:  # every bag had finished: the run is complete, say so and go on
        print("process_bags: interrupted after every bag had finished; results complete",
              file=sys.stderr)

    summary = write_summary(out_dir, records, skipped)
    print(summary_table(summary))
    failed = [r for r in records.values() if r["status"] == "failed"]
    if failed:
        return fail(f"{len(failed)} of {len(bags)} bags failed: " + "; ".join(
            f"{r['bag']} ({r['input']}): {r['error'].splitlines()[0] if r['error'] else '?'}"
            for r in failed))
    return EXIT_OK


def _shut_down(ray, out_dir: Path, todo) -> bool:
    """Stop the Ray instance this run started (``ray``, or None) and remove partial outputs;
    True when a Ctrl-C / SIGTERM came meanwhile (the clean-up still completes)."""
    interrupted = False
    for step in (lambda: ray is not None and ray.shutdown(),
                 lambda: todo and remove_partials(out_dir, [n for _, n in todo])):
        try:
            step()  # remove_partials: a worker killed by the shutdown
        except KeyboardInterrupt:
            interrupted = True
            step()
    return interrupted


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
        ready, _ = ray.wait(list(running), num_returns=len(running), timeout=CANCEL_GRACE_S)
        for ref in ready:  # a task may have finished its bag before the cancel reached it
            try:
                records[running[ref][1]] = ray.get(ref)
            except ray.exceptions.RayError:  # cancelled: its output was removed
                pass
        raise
    finally:
        bar.close()


__all__ = ["BagError", "bag_name", "build_parser", "find_bags", "main", "plan_resources",
           "start_local_ray", "wants_cuda"]


if __name__ == "__main__":
    raise SystemExit(main())
