"""`colcon build` + `colcon test` in a workspace of its own (src/kp_ros -> this checkout),
as a ROS 2 user and the build farm test a package: `colcon test-result` must report the
tests pytest collects. One small group (test file) only, selected with ctest's -R, so the
suite is not run twice."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GROUP = "test_geometry"


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})


def _collected(group: str) -> int:
    result = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                   f"test/{group}.py"], REPO, 300)
    match = re.search(r"(\d+) tests? collected", result.stdout)
    assert match, result.stdout + result.stderr
    return int(match.group(1))


def test_colcon_test_reports_the_suites_tests(tmp_path):
    colcon = shutil.which("colcon")
    if colcon is None:
        pytest.skip("colcon is not installed (pip install colcon-common-extensions)")
    prefixes = os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)
    if not any((Path(p) / "share" / "ament_cmake_pytest").is_dir() for p in prefixes if p):
        pytest.skip("ament_cmake_pytest is not installed (pip install ros-ament-cmake-pytest)")
    workspace = tmp_path / "ws"
    (workspace / "src").mkdir(parents=True)
    (workspace / "src" / "kp_ros").symlink_to(REPO)
    build = _run([colcon, "build", "--packages-select", "kp_ros", "--cmake-args",
                  f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=ON"], workspace, 900)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    test = _run([colcon, "test", "--packages-select", "kp_ros", "--ctest-args", "-R", f"^{GROUP}$"],
                workspace, 900)
    assert test.returncode == 0, test.stdout[-4000:] + test.stderr[-4000:]
    result = _run([colcon, "test-result", "--all", "--test-result-base", "build/kp_ros"],
                  workspace, 120)
    # One line per result file: the group's pytest JUnit XML, and CTest's own Test.xml (which
    # counts the group as 1 CTest test).
    group = re.search(rf"{GROUP}\.xunit\.xml: (\d+) tests, (\d+) errors, (\d+) failures",
                      result.stdout)
    assert group, result.stdout + result.stderr
    tests, errors, failures = (int(v) for v in group.groups())
    assert (errors, failures) == (0, 0), result.stdout
    assert tests == _collected(GROUP) > 0, result.stdout
