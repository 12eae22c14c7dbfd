"""setup.py: ``pip install .`` gives the ROS-free half of kp_ros (the core and the offline
bag tools) in any Python environment. Built here as a wheel and unpacked into a folder
of its own, then used from a process that has no ament index and never imports rclpy:
images -> bag -> process_bag -> Keypoints and Matches read back."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import cv2

from conftest import synthetic_frame
from ros_helpers import REPO_ROOT

CHECK = r"""
import json, sys
from pathlib import Path
from kp_ros.core.package_files import msg_dir, package_file
from kp_ros.bags import messages as bag_messages
from kp_ros.bags import reader as bag_reader
from kp_ros.tools import images_to_bag
from kp_ros.offline import process_bag_cli as process_bag
site, models, frames = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
assert images_to_bag.main([frames, "in.bag", "--rate", "10"]) == 0
assert process_bag.main(["in.bag", "out.bag", "--superpoint-model", models + "/sp",
                         "--eloftr-model", models + "/el", "--device", "cpu", "--resize", "native",
                         "--match-threshold", "0", "--no-progress"]) == 0
store = bag_messages.kp_ros_typestore()
reader = bag_reader.open_bag("out.bag")
counts = {}
for connection, _, data in reader.messages():
    store.deserialize_cdr(data, connection.msgtype)
    counts[connection.msgtype] = counts.get(connection.msgtype, 0) + 1
reader.close()
print(json.dumps({
    "bag_reader": bag_reader.__file__, "msg": str(msg_dir()),
    "config": str(package_file("config/matcher.yaml")),
    "counts": counts, "rclpy": "rclpy" in sys.modules}))
"""


def test_pip_wheel_runs_the_offline_tools_without_ros(tmp_path, tiny_superpoint_dir, tiny_eloftr_dir):
    source = tmp_path / "source"  # pip builds in-tree: keep build/ out of the checkout
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "package.xml"):
        shutil.copy(REPO_ROOT / name, source / name)
    for name in ("kp_ros", "msg", "config"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(wheels), str(source)],
                   check=True, cwd=tmp_path, capture_output=True, text=True)
    (wheel,) = wheels.glob("kp_ros-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    for data in ("kp_ros/share/msg/Keypoints.msg", "kp_ros/share/msg/Matches.msg",
                 "kp_ros/share/config/matcher.yaml", "kp_ros/core/eloftr.py"):
        assert data in names, data
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "process_bag = kp_ros.offline.process_bag_cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"{i:03d}.png"), synthetic_frame(128, 160, seed=0, shift=(2 * i, i)))
    models = tmp_path / "models"
    models.mkdir()
    (models / "sp").symlink_to(tiny_superpoint_dir)
    (models / "el").symlink_to(tiny_eloftr_dir)

    env = {k: v for k, v in os.environ.items() if k not in ("AMENT_PREFIX_PATH", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)  # the unpacked wheel, not the checkout
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([sys.executable, "-c", CHECK, str(site), str(models), str(frames)],
                         env=env, cwd=work, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["bag_reader"].startswith(str(site)), result
    assert result["msg"] == str(site / "kp_ros" / "share" / "msg"), result
    assert result["config"].startswith(str(site)), result
    assert result["counts"] == {"kp_ros/msg/Keypoints": 3, "kp_ros/msg/Matches": 2}, result
    assert result["rclpy"] is False, "the offline tools must not need ROS"
