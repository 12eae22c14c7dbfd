"""kp_demo as installed (colcon, or the venv of scripts/setup_env.sh): run from outside the
source tree, it finds its parameters file in the installed share/kp_ros and runs both
nodes on the frames it is given."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from conftest import synthetic_frame
from ros_helpers import clean_env


def test_installed_kp_demo_runs_outside_the_source_tree(tiny_superpoint_dir, tiny_eloftr_dir, tmp_path):
    exe = shutil.which("kp_demo")
    if exe is None:
        pytest.skip("kp_demo is not installed (scripts/setup_env.sh, or colcon build)")
    from PIL import Image
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.fromarray(synthetic_frame(120, 160, seed=0, shift=(2 * i, i))).save(frames / f"f{i}.png")
    result = subprocess.run(
        [exe, "--frames", str(frames), "--out", str(tmp_path / "out"), "--device", "cpu",
         "--superpoint-model", str(tiny_superpoint_dir), "--eloftr-model", str(tiny_eloftr_dir)],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["frames"] == 3, stats
    assert sorted(p.name for p in (tmp_path / "out").glob("keypoints_*.png"))
    assert np.isfinite(stats["keypoints_per_frame_mean"])
