"""Shared fixtures: tiny random-init models saved like real checkpoints, the shared
TUM frames (skipped with a reason when ../shared is absent), synthetic frames, and a
ROS_DOMAIN_ID of this test process's own."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Random weights produce denormals that make CPU kernels ~8x slower.
torch.set_flush_denormal(True)

REPO_ROOT = Path(__file__).resolve().parents[1]
TUM_DIR = REPO_ROOT.parent / "shared" / "data" / "tum_fr3_long_office_household"

# One DDS domain per pytest process (pid-derived), so parallel or overlapping runs
# cannot cross-talk; subprocesses inherit it. 0..101 keeps ports in range.
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
# Under pytest -n (xdist) the workers inherit the controller's: worker i takes the i-th
# domain after it, so no two workers of one run share one.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw"):
    os.environ["ROS_DOMAIN_ID"] = str(1 + (int(os.environ["ROS_DOMAIN_ID"]) + int(_WORKER[2:])) % 100)
# Default DDS transports, as a camera driver, ros2 bag play and the ros2 CLI use them (and
# the launch file by default): the suite must work with the ROS 2 world around kp_ros.
os.environ.setdefault("ROS_LOG_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "kp_ros_test_logs"))


@pytest.fixture(scope="session")
def tiny_superpoint_dir(tmp_path_factory) -> Path:
    from kp_ros.core.random_init import save_random_superpoint
    return save_random_superpoint(tmp_path_factory.mktemp("superpoint_tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_eloftr_dir(tmp_path_factory) -> Path:
    from kp_ros.core.random_init import save_random_eloftr
    return save_random_eloftr(tmp_path_factory.mktemp("eloftr_tiny"), "tiny", seed=0)


def tum_frame_paths() -> list[Path]:
    return sorted(TUM_DIR.glob("*.png")) if TUM_DIR.is_dir() else []


@pytest.fixture(scope="session")
def tum_frames() -> list[np.ndarray]:
    """The 17 real 640x480 RGB frames (uint8 HxWx3, RGB order)."""
    paths = tum_frame_paths()
    if not paths:
        pytest.skip(f"shared TUM frames not found at {TUM_DIR} (clone with ../shared beside it)")
    from PIL import Image
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def synthetic_frame(height: int = 120, width: int = 160, seed: int = 0, shift=(0, 0)) -> np.ndarray:
    """A textured RGB frame (blobs and edges) with a deterministic pattern; ``shift``
    (dx, dy) moves the content, so consecutive frames overlap like a moving camera."""
    rng = np.random.default_rng(seed)
    big = rng.integers(0, 256, size=(height // 8 + 8, width // 8 + 8, 3), dtype=np.uint8)
    import cv2
    canvas = cv2.resize(big, ((width // 8 + 8) * 8, (height // 8 + 8) * 8), interpolation=cv2.INTER_CUBIC)
    dx, dy = shift
    return np.ascontiguousarray(canvas[32 + dy:32 + dy + height, 32 + dx:32 + dx + width])


@pytest.fixture
def synthetic_frames() -> list[np.ndarray]:
    return [synthetic_frame(seed=0, shift=(2 * i, i)) for i in range(5)]
