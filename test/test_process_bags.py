"""kp_ros.offline.process_bags: many bags on one local Ray instance (2 workers, tiny models),
compared with process_bag run alone on each bag."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from test_process_bag import frames, image_bag, read_outputs

from kp_ros.offline import process_bag_cli as pb
from kp_ros.offline import process_bags as pbs

ray = pytest.importorskip("ray", reason="process_bags needs Ray (pip install 'kp_ros[cluster]')")
psutil = pytest.importorskip("psutil")


def _import_pipeline() -> None:
    import kp_ros.core.eloftr  # noqa: F401 - torch, transformers
    import kp_ros.core.superpoint  # noqa: F401
    import kp_ros.offline.process_bag_cli  # noqa: F401


@pytest.fixture(scope="module")
def local_ray():
    """ONE local Ray instance for the module (start-up is ~10 s here): 2 CPUs, small
    object store, temp files under /tmp (Ray's socket paths must stay short). Every
    process it started must be gone after the shutdown."""
    saved_path = os.environ.get("PYTHONPATH")
    temp_dir = tempfile.mkdtemp(prefix="kpray_", dir="/tmp")
    others = set(psutil.Process().children())  # e.g. another module's node processes
    pbs.start_local_ray(num_cpus=2, temp_dir=temp_dir, object_store_mb=80)
    ray_roots = set(psutil.Process().children()) - others  # gcs_server, raylet, ...
    # Both workers import torch and kp_ros now, while this process builds the tiny models.
    warm_up = [ray.remote(num_cpus=1)(_import_pipeline).remote() for _ in range(2)]
    yield
    ray.wait(warm_up, num_returns=2, timeout=60)
    started = set(ray_roots)
    for root in ray_roots:
        try:
            started |= set(root.children(recursive=True))  # the workers, as they are now
        except psutil.NoSuchProcess:
            pass
    ray.shutdown()
    _, alive = psutil.wait_procs(list(started), timeout=20)
    for proc in alive:  # only processes this Ray instance started
        proc.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)
    if saved_path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved_path
    assert not alive, f"Ray processes outlived the shutdown: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def options(tiny_superpoint_dir, tiny_eloftr_dir):
    return ["--superpoint-model", str(tiny_superpoint_dir), "--eloftr-model", str(tiny_eloftr_dir),
            "--device", "cpu", "--resize", "native", "--max-keypoints", "64",
            "--match-threshold", "0", "--threads", "1", "--no-progress"]


def dataset(root: Path, count=5, corrupt=True) -> Path:
    """seq_a (sqlite3), seq_b (mcap, one folder deeper) and, with ``corrupt``, seq_c: a
    truncated sqlite3 bag."""
    image_bag(root / "seq_a", frames(count))
    image_bag(root / "more" / "seq_b", frames(count, 96, 128), storage="mcap")
    if corrupt:
        image_bag(root / "seq_c", frames(count))
        db3 = root / "seq_c" / "seq_c.db3"
        with open(db3, "r+b") as handle:
            handle.truncate(db3.stat().st_size // 2)
    return root


def raw(path: Path) -> dict:
    """topic -> [(receive time, serialized message)]"""
    return {t: [(log, data) for log, _, data in v] for t, v in read_outputs(path).items()}


def no_partials(directory: Path) -> bool:
    return not any(".partial" in p.name for p in directory.rglob("*"))


def test_bad_bag_reported_others_identical_to_process_bag_then_resume(tmp_path, local_ray, options, capsys):
    data = dataset(tmp_path / "data")
    for name, bag in (("seq_a", data / "seq_a"), ("seq_b", data / "more" / "seq_b")):
        assert pb.main(options + [str(bag), str(tmp_path / "serial" / name)]) == 0
    capsys.readouterr()

    out = tmp_path / "out"
    assert pbs.main(options + [str(data), "--out", str(out), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 bags failed: seq_c" in err and "truncated or corrupt" in err
    assert sorted(p.name for p in out.iterdir()) == ["seq_a", "seq_b", "summary.csv", "summary.json"]
    for name in ("seq_a", "seq_b"):  # byte-identical messages and receive times
        assert raw(out / name) == raw(tmp_path / "serial" / name), name
    summary = json.loads((out / "summary.json").read_text())
    by_bag = {r["bag"]: r for r in summary["bags"]}
    assert summary["last_run"] == {"done": 2, "failed": 1, "skipped": 0}
    assert by_bag["seq_a"]["frames"] == by_bag["seq_b"]["frames"] == 5
    assert by_bag["seq_a"]["keypoints_per_frame"] > 0 and by_bag["seq_a"]["matches_per_frame"] > 0
    assert by_bag["seq_a"]["host"] and by_bag["seq_a"]["seconds"] > 0
    assert by_bag["seq_c"]["status"] == "failed" and "seq_c" in by_bag["seq_c"]["input"]
    assert "seq_a,done,5,5" in (out / "summary.csv").read_text()

    # A rerun skips the finished bags (their outputs untouched) and retries the bad one.
    mtimes = {n: (out / n).stat().st_mtime_ns for n in ("seq_a", "seq_b")}
    assert pbs.main(options + [str(data), "--out", str(out), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "seq_a: skipped" in err and "seq_b: skipped" in err and "1 of 3 bags failed: seq_c" in err
    assert {n: (out / n).stat().st_mtime_ns for n in mtimes} == mtimes
    summary = json.loads((out / "summary.json").read_text())
    by_bag = {r["bag"]: r for r in summary["bags"]}
    assert summary["last_run"] == {"done": 0, "failed": 1, "skipped": 2}
    assert by_bag["seq_a"]["status"] == "skipped" and by_bag["seq_a"]["frames"] == 5  # kept

    # --overwrite redoes a bag (atomically replaced, same bytes); the others stay listed.
    assert pbs.main(options + [str(data / "seq_a"), "--out", str(out), "--overwrite"]) == 0
    assert (out / "seq_a").stat().st_mtime_ns != mtimes["seq_a"]
    assert raw(out / "seq_a") == raw(tmp_path / "serial" / "seq_a")
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["bag"], r["status"]) for r in summary["bags"]] == [
        ("seq_a", "done"), ("seq_b", "skipped"), ("seq_c", "failed")]
    assert summary["last_run"] == {"done": 1, "failed": 0, "skipped": 0}
    assert no_partials(out)


def ctrl_c_when(monkeypatch, condition) -> list:
    """Make the driver's ``ray.wait`` raise KeyboardInterrupt (once) when ``condition()``
    holds after a wait returns; the returned list gets an entry when it did."""
    real_wait, interrupted = ray.wait, []

    def wait(*args, **kwargs):
        result = real_wait(*args, **kwargs)
        if not interrupted and condition():
            interrupted.append(True)
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(ray, "wait", wait)
    return interrupted


def test_interrupt_leaves_no_partial_output(tmp_path, local_ray, options, monkeypatch, capsys):
    data = tmp_path / "data"
    image_bag(data / "seq_a", frames(40, 192, 256))
    image_bag(data / "seq_b", frames(40, 192, 256))
    out = tmp_path / "out"
    # Ctrl-C in the driver while a task is half-way through writing its bag.
    interrupted = ctrl_c_when(monkeypatch, lambda: any(".partial-" in p.name for p in out.glob(".*")))
    code = pbs.main(options + [str(data), "--out", str(out), "--workers", "2"])
    assert interrupted and "interrupted" in capsys.readouterr().err
    # Under load both tasks can finish before the cancel reaches them: the run is then complete.
    assert code == (0 if all((out / n).exists() for n in ("seq_a", "seq_b")) else 130)
    assert no_partials(out)
    for name in ("seq_a", "seq_b"):  # a bag either finished before Ctrl-C, whole, or is absent
        if (out / name).exists():
            assert len(read_outputs(out / name)["/cam/keypoints"]) == 40
    done = {r["bag"] for r in json.loads((out / "summary.json").read_text())["bags"]}
    assert done == {n for n in ("seq_a", "seq_b") if (out / n).exists()}


def test_interrupt_after_the_last_bag_finished_keeps_every_record(
        tmp_path, local_ray, options, monkeypatch, capsys):
    data = tmp_path / "data"
    image_bag(data / "seq_a", frames(6, 96, 128))
    image_bag(data / "seq_b", frames(6, 96, 128))
    out = tmp_path / "out"
    # Ctrl-C the moment the last task's result is ready, before the driver reads it.
    interrupted = ctrl_c_when(monkeypatch, lambda: all((out / n).exists() for n in ("seq_a", "seq_b")))
    assert pbs.main(options + [str(data), "--out", str(out), "--workers", "2"]) == 0
    assert interrupted and "interrupted after every bag had finished" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(r["bag"] for r in summary["bags"]) == ["seq_a", "seq_b"]
    assert summary["last_run"] == {"done": 2, "failed": 0, "skipped": 0}


def test_killed_worker_is_retried(tmp_path, local_ray, options, monkeypatch):
    """SIGKILL the worker half-way through a bag: Ray reruns the task, the output is
    still byte-identical to process_bag's and the dead attempt's partial bag is gone."""
    data = tmp_path / "data"
    image_bag(data / "seq_a", frames(40, 192, 256))
    assert pb.main(options + [str(data / "seq_a"), str(tmp_path / "serial")]) == 0
    out = tmp_path / "out"
    real_wait, killed = ray.wait, []

    def wait(*args, **kwargs):
        result = real_wait(*args, **kwargs)
        if not killed and any(".partial-" in p.name for p in out.glob(".*")):
            for proc in psutil.Process().children(recursive=True):
                try:
                    if "bag_task" in " ".join(proc.cmdline()):
                        proc.kill()
                        killed.append(proc.pid)
                except psutil.Error:
                    pass
        return result

    monkeypatch.setattr(ray, "wait", wait)
    assert pbs.main(options + [str(data), "--out", str(out), "--workers", "1"]) == 0
    assert killed
    assert raw(out / "seq_a") == raw(tmp_path / "serial")
    assert no_partials(out)
    record = json.loads((out / "summary.json").read_text())["bags"][0]
    assert record["status"] == "done" and record["pid"] not in killed


def test_find_bags_and_names(tmp_path):
    data = dataset(tmp_path / "data", count=1, corrupt=False)
    image_bag(tmp_path / "data" / ".seq_x.partial-abc" / "seq_x", frames(1))  # hidden: skipped
    shutil.copy(next((data / "more" / "seq_b").glob("*.mcap")), data / "loose.mcap")
    image_bag(data / "out" / "seq_o", frames(1))  # the output folder: skipped
    bags = pbs.find_bags([data], exclude=data / "out")
    assert [pbs.bag_name(b) for b in bags] == ["loose", "seq_b", "seq_a"]  # walk order: files, then folders by name
    assert pbs.find_bags([data / "more" / "seq_b"]) == [data / "more" / "seq_b"]
    with pytest.raises(pb.BagError, match="neither a bag nor a folder"):
        pbs.find_bags([tmp_path / "missing"])


def test_clear_errors_without_ray_or_with_clashing_names(tmp_path, monkeypatch, capsys, options):
    dataset(tmp_path / "data", count=1, corrupt=False)
    image_bag(tmp_path / "other" / "seq_a", frames(1))
    assert pbs.main(options + [str(tmp_path / "data"), str(tmp_path / "other"), "--out", str(tmp_path / "o")]) == 1
    assert "several bags would write the same output: seq_a" in capsys.readouterr().err
    monkeypatch.setattr(pbs, "import_ray", lambda: None)
    assert pbs.main([str(tmp_path / "data"), "--out", str(tmp_path / "o")]) == 1
    assert "pip install 'kp_ros[cluster]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resource_plan():
    args = pbs.build_parser().parse_args(["x", "--out", "o"])
    plan = pbs.plan_resources
    assert plan(args, cuda=False, gpus=0, cpus=16, bags=100) == (16, 1, 0.0)   # one task per core
    assert plan(args, cuda=False, gpus=0, cpus=16, bags=4) == (4, 4, 0.0)      # fair share of threads
    assert plan(args, cuda=False, gpus=0, cpus=16, bags=100, memory_gb=9) == (4, 4, 0.0)
    assert plan(args, cuda=False, gpus=0, cpus=1, bags=3, memory_gb=0.5) == (1, 1, 0.0)
    assert plan(args, cuda=True, gpus=4, cpus=16, bags=100) == (4, 4, 1.0)
    assert plan(args, cuda=True, gpus=4, cpus=64, bags=9, cluster=True) == (9, 2, 1.0)
    args = pbs.build_parser().parse_args(["x", "--out", "o", "--threads", "4"])
    assert plan(args, cuda=False, gpus=0, cpus=16, bags=100) == (4, 4, 0.0)
    args = pbs.build_parser().parse_args(["x", "--out", "o", "--workers", "2", "--threads", "3",
                                          "--gpus-per-task", "0.5"])
    assert plan(args, cuda=False, gpus=0, cpus=16, bags=100) == (2, 3, 0.0)
    assert plan(args, cuda=True, gpus=1, cpus=16, bags=100) == (2, 3, 0.5)
    assert pbs.wants_cuda({"device": "auto"}, {"device": "auto"}, gpus_available=0) is False
    assert pbs.wants_cuda({"device": "auto"}, {"device": "cpu"}, gpus_available=1) is True
    assert pbs.wants_cuda({"device": "cuda:1"}, {"device": "cpu"}, gpus_available=0) is True


def test_interrupt_after_every_bag_finished_exits_0(tmp_path, local_ray, options, monkeypatch, capsys):
    """Ctrl-C once every bag is done (e.g. during the Ray shutdown) loses nothing: exit 0."""
    data, out = tmp_path / "data", tmp_path / "out"
    image_bag(data / "seq_a", frames(3, 64, 96))
    real_run = pbs._run

    def run_then_interrupt(*args):
        real_run(*args)
        raise KeyboardInterrupt
    monkeypatch.setattr(pbs, "_run", run_then_interrupt)
    assert pbs.main(options + [str(data), "--out", str(out), "--workers", "1"]) == 0
    assert "after every bag had finished" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["bag"], r["status"]) for r in summary["bags"]] == [("seq_a", "done")]
