"""Device names on CUDA machines, without one: ``cuda:N`` inside a Ray GPU task (which
sees only its assigned GPU, as cuda:0) becomes ``cuda``."""
from __future__ import annotations

import pytest

from kp_ros.core.model_loading import device_for_assigned_gpus
from kp_ros.offline.ray_tasks import on_assigned_gpus


@pytest.mark.parametrize("name, gpus, expected", [
    ("cuda:3", [3], "cuda"), ("cuda:1", ["1"], "cuda"), ("cuda", [0], "cuda"),
    ("CUDA:2", [2, 5], "cuda"),  # several assigned: the first (visible as cuda:0)
    ("cpu", [1], "cpu"), ("auto", [1], "auto"),
    ("cuda:3", [], "cuda:3"),    # not in a GPU task: unchanged (resolve_device checks it)
])
def test_cuda_n_becomes_the_assigned_gpu(name, gpus, expected):
    assert device_for_assigned_gpus(name, gpus) == expected


def test_task_options_are_mapped_once_and_said_once():
    said = []
    detector, matcher = {"model": "sp", "device": "cuda:2"}, {"model": "lo", "device": "cuda:2"}
    mapped = on_assigned_gpus((detector, matcher, 0.5), [2], said.append)
    assert mapped == ({"model": "sp", "device": "cuda"}, {"model": "lo", "device": "cuda"}, 0.5)
    assert detector["device"] == "cuda:2"  # the driver's options are not modified
    assert len(said) == 1 and "cuda:2 -> cuda" in said[0] and "GPU 2" in said[0]
    assert on_assigned_gpus((None, matcher, 0.5), [], said.append) == (None, matcher, 0.5)
    assert len(said) == 1
