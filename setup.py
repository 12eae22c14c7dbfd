"""``pip install .``: kp_ros's ROS-free half into any Python environment.

That is the core library (``kp_ros.core``: preprocessing, SuperPoint, EfficientLoFTR,
post-processing, visualization, bag I/O) and the offline tools that need no ROS at all
(``process_bag``, ``images_to_bag``), e.g. for evaluation in a training environment.
The messages and the nodes need the ROS build, CMakeLists.txt (colcon, or
scripts/setup_env.sh without a ROS install); colcon never runs this file.

Metadata, dependencies and the entry points live in setup.cfg (CMakeLists.txt reads the
same entry points). Here: the msg/ definitions and config/ go inside the Python package
(``kp_ros/share/``), so the bag tools find them wherever pip puts the package.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SHARED = ("msg/*.msg", "config/*.yaml")


class BuildPyWithShare(build_py):
    def run(self):
        super().run()
        for pattern in SHARED:
            for source in sorted(HERE.glob(pattern)):
                target = Path(self.build_lib) / "kp_ros" / "share" / source.relative_to(HERE)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)


setup(cmdclass={"build_py": BuildPyWithShare})
