"""kp_ros/core/models.py: the registry agrees with the core classes, and a new model or a
new input kind plugs into the node base with no change to the base or the worker."""
import inspect
import sys
from dataclasses import dataclass, replace

import numpy as np
import pytest
import rclpy
from rclpy.parameter import Parameter

from kp_ros.core import models, params
from kp_ros.core.frames import FrameBundle
from kp_ros.core.params import ParamSpec


@pytest.mark.parametrize("name", list(models.MODELS))
def test_entries_match_their_core_classes(name):
    entry = models.model(name)
    accepted = inspect.signature(entry.model_class).parameters
    assert set(entry.core_keywords) <= set(accepted)
    required = {n for n, p in accepted.items() if p.default is inspect.Parameter.empty}
    assert required <= set(entry.core_keywords)
    # What may change at runtime is exactly the core's settings dataclass that the spec
    # marks runtime: the node never lists those names by hand.
    settings = inspect.signature(entry.model_class.set_params).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in settings.values()):
        # set_params(**changes) checks the names against its module's PARAM_NAMES
        settings = sys.modules[entry.model_class.__module__].PARAM_NAMES
    assert set(entry.runtime_keywords) == set(settings) - {"self"}
    assert entry.default_model == params.spec(entry.node, "model").default
    assert models.for_node(entry.node) is entry


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="superpoint"):
        models.model("orb")


# --- a detector added as a contributor would: specs, a core class, one entry ----------

@dataclass(frozen=True)
class GridParams:
    spacing: int = 16

    def validated(self):
        if self.spacing < 2:
            raise ValueError(f"spacing must be >= 2, got {self.spacing}")
        return self


class GridDetector:
    """Keypoints on a regular grid: the smallest core model the contract allows."""
    instances = []

    def __init__(self, model, device="cpu", precision="fp32", spacing=16):
        self.device = "cpu" if device == "auto" else device  # as the real cores resolve it
        self.model_id, self.params = model, GridParams(spacing).validated()
        self.precision = type("Precision", (), {"note": precision, "warning": None})()
        GridDetector.instances.append(self)

    def set_params(self, spacing=None):
        self.params = replace(self.params, spacing=spacing).validated()

    def detect(self, image):
        s = self.params.spacing
        ys, xs = np.mgrid[0:image.shape[0]:s, 0:image.shape[1]:s]
        keypoints = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
        return {"keypoints": keypoints, "scores": np.ones(len(keypoints), np.float32),
                "descriptors": np.zeros((len(keypoints), 0), np.float32)}


GRID_SPECS = (
    ParamSpec("model", "grid", "Name of the grid model (no weights).", runtime=False),
    ParamSpec("spacing", 16, "Pixels between two grid keypoints.", 1, 256),
)
COMMON_USED = ("device", "precision", "use_compressed", "reliable_input", "debug_image",
               "diagnostics_period")
GRID_SPECS += tuple(s for s in params.COMMON if s.name in COMMON_USED)


@pytest.fixture
def grid_entry(monkeypatch):
    monkeypatch.setitem(params.NODES, "grid_node", GRID_SPECS)
    entry = models.ModelEntry("grid", "detector", "grid_node", "Grid",
                              f"{__name__}:GridDetector", "unused:unused")
    monkeypatch.setitem(models.MODELS, "grid", entry)
    GridDetector.instances.clear()
    return entry


@pytest.fixture
def ros_context():
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    context.try_shutdown()


def make_grid_node(grid_entry, context, make_input=None, **overrides):
    from kp_ros.ros.feature_node import FeatureNode

    class GridNode(FeatureNode):
        MODEL = grid_entry

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seen = []

        def process(self, bundle, images):
            self.seen.append((bundle.stamp_ns, [image.shape for image in images],
                              len(self.core.detect(images[0])["keypoints"])))

    if make_input is not None:
        GridNode.make_input = make_input
    return GridNode(context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in overrides.items()])


def test_a_new_detector_gets_parameters_validation_and_runtime_changes(grid_entry, ros_context):
    node = make_grid_node(grid_entry, ros_context, spacing=8)
    try:
        core = GridDetector.instances[-1]
        assert node.NODE_NAME == "grid_node" and core.params.spacing == 8
        assert node.get_parameter("spacing").value == 8
        # Rejected by the core's own check in on_set: nothing changes anywhere.
        result = node.set_parameters([Parameter("spacing", value=1)])[0]
        assert not result.successful and "spacing must be >= 2" in result.reason
        assert core.params.spacing == 8 and node.values["spacing"] == 8
        # Not runtime: rejected with the reason.
        result = node.set_parameters([Parameter("model", value="other")])[0]
        assert not result.successful and "cannot change while running" in result.reason
        # Accepted: applied (post_set) to the core and the node's values.
        assert node.set_parameters([Parameter("spacing", value=32)])[0].successful
        assert core.params.spacing == 32 and node.values["spacing"] == 32
    finally:
        node.shutdown()
        node.destroy_node()


class PairInput:
    """A second input kind (two cameras): bundles of two images, nothing else changed."""

    def __init__(self, node):
        self.node, self.topic, self.problem, self.counters = node, "pair", None, {"pairs": 0}

    def describe_qos(self):
        return "test"

    def matched_publishers(self):
        return 0

    def push(self, stamp_ns, left, right):
        from kp_ros.ros.conversions import array_to_image_msg
        self.counters["pairs"] += 1
        self.node.on_bundle(FrameBundle((array_to_image_msg(left), array_to_image_msg(right)),
                                        stamp_ns, (None, None)))


def test_a_second_input_kind_plugs_into_the_node_base(grid_entry, ros_context):
    node = make_grid_node(grid_entry, ros_context, make_input=lambda self: PairInput(self),
                          spacing=16)
    try:
        node.start()
        left = np.zeros((64, 96, 3), np.uint8)
        right = np.zeros((32, 48), np.uint8)
        node.input.push(5, left, right)
        assert node.worker.wait_idle(10)
        assert node.seen == [(5, [(64, 96, 3), (32, 48)], 4 * 6)]  # both decoded, as sent
        counts = node.worker.snapshot()
        assert (counts.received, counts.processed) == (1, 1)
    finally:
        node.shutdown()
        node.destroy_node()


def test_startup_errors_are_startup_errors(grid_entry, ros_context):
    from kp_ros.ros.node_base import StartupError
    with pytest.raises(StartupError, match="spacing must be >= 2"):
        make_grid_node(grid_entry, ros_context, spacing=1)
    with pytest.raises(StartupError, match="precision must be one of"):
        make_grid_node(grid_entry, ros_context, precision="int4")


def test_runtime_names_come_from_the_specs():
    entry = models.model("superpoint")
    spec_runtime = {s.name for s in entry.specs if s.runtime and not s.node_only}
    assert set(entry.runtime_keywords) == spec_runtime
