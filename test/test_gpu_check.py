"""scripts/gpu_check without a GPU: its one-line answer when there is no CUDA, and its dry run
(the whole check on the CPU, tiny models) producing a report with every part; the report
helpers on made-up results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kp_ros.testing import gpu_check

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "gpu_check"


def run(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)  # no GPU, on any machine
    return subprocess.run([str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    result = run()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines() == [gpu_check.NO_CUDA_LINE]


def test_dry_run_runs_every_part_and_writes_one_report(tmp_path):
    out = tmp_path / "check"
    result = run("--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    report_path = Path(result.stdout.strip().splitlines()[-1].split("report: ")[1])
    assert report_path == out / "gpu_check.md"
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["status"] == "pass" and list(report["parts"]) == list(gpu_check.PARTS)
    assert report["device"]["dry_run"] is True
    for name, part in report["parts"].items():
        assert part["status"] == "pass" and part["seconds"] > 0 and Path(part["log"]).exists(), (name, part)
    tests = report["parts"]["tests"]
    assert tests["counts"]["failed"] == tests["counts"]["errors"] == 0
    assert tests["counts"]["skipped"] > 0 and any("needs CUDA" in r for r in tests["skip_reasons"])
    live = report["parts"]["live"]
    assert set(live["nodes"]) == set(gpu_check.LIVE_NODES)
    for node, entry in live["nodes"].items():
        assert entry["started"] and entry["exit_code"] == 0 and entry["shutdown"], (node, entry)
        assert entry["warm_up_s"] is None  # the CPU does not warm up
    assert live["nodes"]["superpoint_node"]["outputs"] == live["frames"]
    assert live["nodes"]["eloftr_node"]["outputs"] == live["frames"] - 1
    bench = report["parts"]["bench"]
    assert {"superpoint/fp32", "eloftr/fp32"} <= set(bench["paths"])
    assert all(value["ms"] > 0 and value["peak_mib"] is None for value in bench["paths"].values())  # CPU: no peak
    assert bench["largest"]["eloftr/fp32"]["size"] == "96x128"
    text = report_path.read_text()
    for heading in ("# gpu_check: PASS", "## tests", "## live", "## bench", "| superpoint_node |",
                    "| track_node |", "| eloftr/fp32 |"):
        assert heading in text, heading


def test_a_part_over_its_timeout_is_reported_and_ends_what_it_started(tmp_path):
    log = tmp_path / "child.log"
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(60)']); print(child.pid, flush=True); time.sleep(60)")
    code, seconds = gpu_check.run_child([sys.executable, "-c", script], log, dict(os.environ), 5.0, tmp_path)
    assert code is None and 5.0 <= seconds < 30.0
    grandchild = Path(f"/proc/{int(log.read_text().split()[0])}/status")
    assert not grandchild.exists() or "zombie" in grandchild.read_text()  # ended with its group


def test_failing_and_skipped_tests_fail_the_part_on_a_gpu(tmp_path):
    junit = tmp_path / "tests.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                     '<testcase classname="a" name="bad"><failure message="x"/></testcase>'
                     '<testcase classname="a" name="skip"><skipped message="needs CUDA"/></testcase>'
                     '</testsuite></testsuites>')
    counts, failed = gpu_check.junit_counts(junit)
    assert counts == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1} and failed == ["a::bad"]
    assert gpu_check.skip_reasons(junit) == ["needs CUDA"]


def test_report_markdown_names_the_gpu_and_every_part():
    report = {"status": "fail", "seconds": 200.0, "size": "full",
              "device": {"requested": "cuda", "dry_run": False, "torch": "2.x", "python": "3.11", "host": "h",
                         "cpus": 16, "name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8,
                         "cuda": "12.8", "cudnn": 91000},
              "parts": {"tests": {"status": "pass", "seconds": 60.0, "summary": "20 passed", "log": "t.log"},
                        "live": {"status": "timeout", "seconds": 75.0, "summary": "timed out after 75 s",
                                 "log": "l.log"},
                        "bench": {"status": "fail", "seconds": 3.0, "summary": "exited with code 1", "log": "b.log"}}}
    text = gpu_check.markdown(report)
    assert text.startswith("# gpu_check: FAIL in 200 s")
    assert "NVIDIA H200 (sm 9.0, 139.8 GiB), CUDA 12.8" in text
    assert "| live | timeout | 75.0 | timed out after 75 s |" in text
