"""Where kp_ros's own files are (msg/*.msg, config/*.yaml), installed or not. ROS-free:
the ament index is asked when ``ament_index_python`` is importable, else skipped."""
from __future__ import annotations

from pathlib import Path


class PackageFileNotFound(FileNotFoundError):
    """A file of the kp_ros package is neither installed nor in the source tree."""


def package_file(relative: str) -> Path:
    """A file of the kp_ros package (e.g. msg/Keypoints.msg, config/matcher.yaml): the
    installed share/kp_ros copy when the package is installed (ament index), else the
    copy a ``pip install .`` puts in kp_ros/share/ (setup.py), else the source tree's."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            installed = Path(get_package_share_directory("kp_ros")) / relative
            if installed.is_file():
                return installed
        except (PackageNotFoundError, KeyError, ValueError, OSError):  # OSError: no AMENT_PREFIX_PATH
            pass
    except ImportError:
        pass
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "share" / relative, package.parent / relative):
        if candidate.is_file():
            return candidate
    raise PackageFileNotFound(f"cannot find kp_ros's {relative}: neither in the ament index "
                              f"(AMENT_PREFIX_PATH) nor next to the package at {package}")


def msg_dir() -> Path:
    """The directory holding Keypoints.msg, Matches.msg and Tracks.msg."""
    return package_file("msg/Keypoints.msg").parent
