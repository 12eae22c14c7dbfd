"""FeatureNode: the node base of the model nodes (superpoint_node, eloftr_node).

It builds the core model from the registry (kp_ros/core/models.py), subscribes through a
frame input (``make_input``: one camera by default, kp_ros/ros/inputs.py), hands each
FrameBundle to the keep-latest worker, decodes its images there and calls
``process(bundle, images)``: core -> message -> publish, in that order. Runtime parameter
changes are checked against the core's settings before any callback applies them.
"""
from __future__ import annotations

import time
import traceback
import warnings
from collections import deque
from dataclasses import fields, replace

import rclpy.task

from kp_ros.core.device_errors import EXIT_DEVICE_FAILED, device_still_works, is_sticky_device_error
from kp_ros.core.image_codec import ImageDecodeError
from kp_ros.core.models import ModelEntry
from kp_ros.core.precision import PrecisionWarning
from kp_ros.core.warmup import describe_warm_up, warm_up
from kp_ros.ros.conversions import image_msg_to_model_input
from kp_ros.ros.diagnostics import latency_values, stamp_age
from kp_ros.ros.frame_worker import FrameRejected, LatestFrameWorker
from kp_ros.ros.inputs import MonoInput
from kp_ros.ros.node_base import NodeBase, StartupError


class FeatureNode(NodeBase):
    """Subclasses set ``MODEL`` (a registry entry) and implement ``process``; they may
    override ``core_extras``, ``apply_node_params``, ``on_arrival`` and ``make_input``.
    A node of several models (frontend_node) sets ``NODE_NAME`` and ``SPECS`` itself and
    overrides ``build_cores``; ``self.core`` is then the first of them."""

    MODEL: ModelEntry

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "MODEL" in cls.__dict__:  # one model: one name and its specs, from the registry
            cls.NODE_NAME, cls.SPECS = cls.MODEL.node, cls.MODEL.specs

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PrecisionWarning)  # logged below, as ROS
                self.cores = self.build_cores()
        except ValueError as exc:  # a setting the core refuses (e.g. an unknown device)
            raise StartupError(str(exc)) from None
        self.core = next(iter(self.cores.values()))
        for warning in dict.fromkeys(core.precision.warning for core in self.cores.values()):
            if warning:
                self.get_logger().warning(warning)
        # A sticky CUDA error ends the process (exit EXIT_DEVICE_FAILED) so respawn restarts it.
        self.device_failed = rclpy.task.Future()  # run_node spins until it is done
        self.worker = LatestFrameWorker(
            self._process_frame, self._on_failed, is_fatal=lambda exc: is_sticky_device_error(
                exc, lambda: device_still_works(self.core.device)),
            on_fatal=self._on_device_failed)
        self._stamp_ages = deque(maxlen=200)  # s, header stamp -> outputs published (node clock)
        self._diag_prev = (time.monotonic(), 0, 0)
        self.input = None
        self.warm_up_seconds: float | None = None

    def start(self) -> None:
        """Subscribe and start publishing diagnostics: called once the whole node (subclass
        publishers included) is built, so no frame reaches a half-built node."""
        if self.input is not None:
            return
        self.warm_up_seconds = warm_up(self.warm_up_step(), self.core.device)  # CUDA only
        self.input = self.make_input()
        self.create_timer(self.values["diagnostics_period"], self._publish_diagnostics)

    def announce(self) -> None:
        self.get_logger().info(f"{self.describe()} on {self.input.topic} "
                               f"({self.input.describe_qos()}){describe_warm_up(self.warm_up_seconds)}")

    # --- for subclasses -------------------------------------------------------------
    def make_input(self):
        return MonoInput(self, self.on_bundle, self.reject_on_arrival,
                         use_compressed=self.values["use_compressed"],
                         reliability=self.values["reliable_input"],
                         on_camera_info=self.on_camera_info)

    def core_extras(self) -> dict:
        """Constructor keywords of the core model that are not parameters."""
        return {}

    def build_cores(self) -> dict:
        """Registry entry -> its core model, built from the parameter values."""
        return {self.MODEL: self.MODEL.build(self.values, **self.core_extras())}

    def apply_node_params(self, changes: dict) -> None:
        """Runtime changes the node applies itself (those the core does not take)."""

    def on_camera_info(self, msg) -> None:
        """Every CameraInfo beside the image, in the subscription callback."""

    def on_arrival(self, bundle):
        """Called in the subscription callback for every received bundle, before the
        keep-latest hand-off; what it returns reaches ``process`` as ``bundle.arrival``.
        For what must see every frame, even those dropped later (e.g. stamp gaps)."""
        return None

    def process(self, bundle, images: tuple) -> None:
        raise NotImplementedError

    def extra_diagnostics(self) -> dict:
        """Values a subclass adds to its /diagnostics status (e.g. stream resets)."""
        return {}

    def describe(self) -> str:
        return (f"{self.MODEL.title} {self.core.model_id} on {self.core.device}, "
                f"precision {self.core.precision.note}")

    def warm_up_step(self):
        """One dummy frame through the core, for the warm-up at start (kp_ros/core/warmup.py)."""
        core = self.core
        return core.detect if hasattr(core, "detect") else (lambda image: core.match_pair(image, image))

    # --- parameters -----------------------------------------------------------------
    @staticmethod
    def _core_changes(entry: ModelEntry, changes: dict) -> dict:
        return {k: v for k, v in changes.items() if k in entry.runtime_keywords}

    def check_params(self, changes: dict) -> None:
        for entry, core in self.cores.items():
            mine = self._core_changes(entry, changes)
            if mine:  # the core's own checks, on a copy: nothing changes here
                replace(core.params, **mine).validated()

    def apply_params(self, changes: dict) -> None:
        taken = set()
        for entry, core in self.cores.items():
            mine = self._core_changes(entry, changes)
            if mine:
                core.set_params(**mine)
                taken.update(mine)
        self.apply_node_params({k: v for k, v in changes.items() if k not in taken})

    # --- frames ---------------------------------------------------------------------
    def on_bundle(self, bundle) -> None:
        """The input's callback: never waits for inference. An exception here is counted
        and logged (with its traceback), never the end of the spin."""
        try:
            bundle.arrival = self.on_arrival(bundle)
        except Exception as exc:  # noqa: BLE001 - one frame's problem
            reason = f"{type(exc).__name__} on arrival"
            self.worker.reject(reason)
            self._log_rejected(reason, exc)
            return
        self.worker.submit(bundle)

    def reject_on_arrival(self, msg, reason: str) -> None:
        """A frame refused by the input's cheap checks: counted, never in the slot."""
        self.worker.reject(reason)
        self._log_rejected(reason, FrameRejected(reason))

    def _process_frame(self, bundle) -> None:
        try:
            images = tuple(image_msg_to_model_input(msg) for msg in bundle.msgs)
        except ImageDecodeError as exc:
            raise FrameRejected(str(exc)) from exc
        self.process(bundle, images)
        self._stamp_ages.append(stamp_age(self, bundle.msgs[0].header.stamp))

    def _on_failed(self, bundle, reason: str, exc: BaseException) -> None:
        self._log_rejected(reason, exc)

    def _on_device_failed(self, exc: BaseException) -> None:
        self.get_logger().fatal(f"the device failed and stays unusable in this process: {exc!r}; "
                                f"exiting with code {EXIT_DEVICE_FAILED} (respawn:=true restarts it)")
        self.device_failed.set_result(exc)  # wakes run_node's spin

    def _log_rejected(self, reason: str, exc: BaseException) -> None:
        failure = not isinstance(exc, FrameRejected)  # a failure inside processing: where
        detail, trace = (f": {exc!r}", "\n" + "".join(traceback.format_exception(exc)).rstrip()) \
            if failure else ("", "")
        self.log_rejected(f"frame rejected: {reason}{detail} "
                          f"(rejected so far: {self.worker.snapshot().rejected}){trace}")

    def _publish_diagnostics(self) -> None:
        counts = self.worker.snapshot()
        now = time.monotonic()
        then, received0, processed0 = self._diag_prev
        self._diag_prev = (now, counts.received, counts.processed)
        elapsed = max(now - then, 1e-6)
        warning = self.input.problem or (f"{counts.rejected} frames rejected"
                                         if counts.rejected else None)
        values = {
            "input rate (Hz)": (counts.received - received0) / elapsed,
            "processed rate (Hz)": (counts.processed - processed0) / elapsed,
            **{f.name: getattr(counts, f.name) for f in fields(counts) if f.name != "reasons"},
            **self.input.counters,  # e.g. lost: frames the middleware reported lost
            **self.extra_diagnostics(),
            **latency_values(self.worker.latencies),
            **latency_values(self._stamp_ages, "stamp latency"),
            "device": str(self.core.device), "model": self.core.model_id,
            "input topic": self.input.topic, "input QoS": self.input.describe_qos(),
            "input publishers matched": self.input.matched_publishers(),
        }
        self.publish_diagnostics("feature pipeline", str(self.core.device), values, warning)

    def shutdown(self) -> None:
        """Finish the frame in progress and log the counters."""
        self.worker.stop()
        self.get_logger().info(f"shutting down: {self.worker.snapshot().summary()}")
