"""What superpoint_node and eloftr_node share: parameters, image subscription,
keep-latest worker, bad-input accounting, diagnostics and clean shutdown.

A subclass declares its model parameters, builds its core model, and implements
``process(frame)``: decode -> core -> message -> publish, in that order.
"""
from __future__ import annotations

import signal
import time
from collections import deque
from dataclasses import fields

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image

from kp_ros.core import params
from kp_ros.core.image_codec import ImageDecodeError
from kp_ros.core.params import ParamSpec
from kp_ros.core.model_loading import ModelUnavailableError
from kp_ros.ros.diagnostics import diagnostic_array, latency_values, stamp_age
from kp_ros.ros.conversions import array_to_image_msg, image_msg_problem, image_msg_to_model_input
from kp_ros.ros.frame_worker import FrameRejected, LatestFrameWorker
from kp_ros.ros.image_input import ImageInput
from kp_ros.ros.qos import output_qos


class Param(ParamSpec):
    """A kp_ros.core.params.ParamSpec that can build its ROS ParameterDescriptor."""

    @classmethod
    def of(cls, spec: ParamSpec) -> "Param":
        return cls(**{f.name: getattr(spec, f.name) for f in fields(ParamSpec)})

    def descriptor(self) -> ParameterDescriptor:
        text = self.description + (f" One of: {', '.join(self.choices)}." if self.choices else "")
        desc = ParameterDescriptor(description=text, dynamic_typing=self.normalize is not None)
        if self.low is not None and isinstance(self.default, bool) is False:
            if isinstance(self.default, int):
                desc.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high), step=1)]
            elif isinstance(self.default, float):
                desc.floating_point_range = [FloatingPointRange(from_value=float(self.low),
                                                                to_value=float(self.high), step=0.0)]
        return desc


def ros_params(specs) -> tuple[Param, ...]:
    return tuple(Param.of(spec) for spec in specs)


COMMON_PARAMS = ros_params(params.COMMON)


def parameter_changes(specs: dict, values: dict, params) -> tuple[dict, str | None]:
    """The changes a ``ros2 param set`` asks for, canonical (aliases normalized), or the
    reason to reject them all: an unknown value, a choice not offered, or a parameter that
    cannot change while running. Parameters not in ``specs`` are ignored."""
    changes = {}
    for param in params:
        spec = specs.get(param.name)
        if spec is None:
            continue
        try:
            value = spec.normalize(param.value) if spec.normalize is not None else param.value
        except ValueError as exc:
            return {}, str(exc)
        if not spec.runtime and value != values[param.name]:
            return {}, (f"{param.name} cannot change while running: restart the node "
                        f"(ros2 launch / ros2 run) with the new value")
        if spec.choices and value not in spec.choices:
            return {}, f"{param.name} must be one of {', '.join(spec.choices)}, got {value!r}"
        changes[param.name] = value
    return changes, None


class FeatureNode(Node):
    """Base class; see module docstring. Subclasses set ``MODEL_PARAMS`` and implement
    ``build_core(values)``, ``apply_params(changes)`` and ``process(msg, image)``."""

    NODE_NAME = "feature_node"
    MODEL_PARAMS: tuple[Param, ...] = ()

    def __init__(self, name: str, **kwargs):
        super().__init__(name, **kwargs)
        self._params = {p.name: p for p in self.MODEL_PARAMS + COMMON_PARAMS}
        for p in self._params.values():
            self.declare_parameter(p.name, p.default, p.descriptor())
        self.values = {name: self._normalized(name, self.get_parameter(name).value)
                       for name in self._params}
        for name, value in self.values.items():
            reason = self._choice_error(name, value)
            if reason:
                raise ValueError(reason)

        self.core = self.build_core(self.values)  # may raise ModelUnavailableError / ValueError
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._debug_pub = self.create_publisher(Image, "~/debug_image", output_qos())
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.worker = LatestFrameWorker(self._process_frame, self._log_rejected)
        self._stamp_ages = deque(maxlen=200)  # s, header stamp -> outputs published (node clock)
        self._last_reject_log = 0.0
        self._diag_prev = (time.monotonic(), 0, 0)
        self._started = time.monotonic()
        self.input: ImageInput | None = None

    def start(self) -> None:
        """Subscribe and start publishing diagnostics: called once the whole node (subclass
        publishers included) is built, so no frame reaches a half-built node."""
        if self.input is not None:
            return
        if self.values["use_compressed"]:
            topic, msg_type = "image/compressed", CompressedImage
        else:
            topic, msg_type = "image", Image
        self.input = ImageInput(self, msg_type, topic, self.values["reliable_input"], self.on_image)
        self.create_timer(self.values["diagnostics_period"], self._publish_diagnostics)

    def announce(self) -> None:
        """The start-up line: what runs on which topic. Logged once the whole node (subclass
        included) is built, so a node stopped while starting still logs its counters."""
        self.get_logger().info(f"{self.describe()} on {self.input.topic} ({self.input.describe_qos()})")

    # --- for subclasses -------------------------------------------------------------
    def build_core(self, values: dict):
        raise NotImplementedError

    def apply_params(self, changes: dict) -> None:
        """Pass runtime changes to the core; raise ValueError with the reason to reject."""
        raise NotImplementedError

    def on_arrival(self, msg):
        """Called in the subscription callback for every received frame, before the
        keep-latest hand-off; what it returns reaches ``process`` with that frame. For
        what must see every frame, even those dropped later (e.g. stamp gaps)."""
        return None

    def process(self, msg, image: np.ndarray, arrival) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.get_name()

    # --- shared machinery -----------------------------------------------------------
    def debug_wanted(self) -> bool:
        return self.values["debug_image"] or self._debug_pub.get_subscription_count() > 0

    def publish_debug(self, image_rgb: np.ndarray, header) -> None:
        self._debug_pub.publish(array_to_image_msg(image_rgb, "rgb8", header))

    def on_image(self, msg) -> None:
        """The subscription callback: never waits for inference. What is cheap to check
        (encoding, sizes, data length, empty compressed data) is checked here, so a frame
        that will be rejected never displaces a good one from the keep-latest slot and never
        counts in the stream's continuity."""
        problem = image_msg_problem(msg)
        if problem is not None:
            self.worker.reject(problem)
            self._log_rejected(msg, problem, FrameRejected(problem))
            return
        self.worker.submit((msg, self.on_arrival(msg)))

    def _process_frame(self, item) -> None:
        msg, arrival = item
        try:
            image = image_msg_to_model_input(msg)
        except ImageDecodeError as exc:
            raise FrameRejected(str(exc)) from exc
        self.process(msg, image, arrival)
        self._stamp_ages.append(stamp_age(self, msg.header.stamp))

    def _log_rejected(self, item, reason: str, exc: BaseException) -> None:
        # Throttled by hand: rclpy's throttle_duration_sec needs a ROS clock tick.
        now = time.monotonic()
        if now - self._last_reject_log < 1.0:
            return
        self._last_reject_log = now
        counts = self.worker.snapshot()
        detail = "" if isinstance(exc, FrameRejected) else f": {exc!r}"
        self.get_logger().error(f"frame rejected: {reason}{detail} (rejected so far: {counts.rejected})")

    def _normalized(self, name: str, value):
        normalize = self._params[name].normalize
        return normalize(value) if normalize is not None else value

    def _choice_error(self, name: str, value) -> str | None:
        choices = self._params[name].choices
        if choices and value not in choices:
            return f"{name} must be one of {', '.join(choices)}, got {value!r}"
        return None

    def _on_set_parameters(self, params) -> SetParametersResult:
        changes, reason = parameter_changes(self._params, self.values, params)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        try:
            self.apply_params(changes)
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        self.values.update(changes)
        return SetParametersResult(successful=True)

    def _publish_diagnostics(self) -> None:
        counts = self.worker.snapshot()
        now = time.monotonic()
        then, received0, processed0 = self._diag_prev
        self._diag_prev = (now, counts.received, counts.processed)
        elapsed = max(now - then, 1e-6)
        warning = f"{counts.rejected} frames rejected" if counts.rejected else None
        if self.input is not None and self.input.problem:
            warning = self.input.problem
        values = {
            "input rate (Hz)": (counts.received - received0) / elapsed,
            "processed rate (Hz)": (counts.processed - processed0) / elapsed,
            "received": counts.received, "processed": counts.processed,
            "dropped": counts.dropped, "rejected": counts.rejected,
            **latency_values(self.worker.latencies),
            **latency_values(self._stamp_ages, "stamp latency"),
            "device": str(self.core.device), "model": self.core.model_id,
            "input topic": self.input.topic if self.input else "",
            "input QoS": self.input.describe_qos() if self.input else "",
            "input publishers matched": self.input.matched_publishers() if self.input else 0,
        }
        self._diag_pub.publish(diagnostic_array(self, "feature pipeline", str(self.core.device),
                                                values, warning))

    def shutdown(self) -> None:
        """Finish the frame in progress and log the counters."""
        self.worker.stop()
        self.get_logger().info(f"shutting down: {self.worker.snapshot().summary()}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_node(node_class, args=None) -> int:
    """main() body shared by the node executables: init, spin, clean SIGINT shutdown.

    A model that cannot be loaded or an invalid parameter ends the process with one
    clear error line and exit code 1, not a traceback."""
    # Our own SIGINT handling: rclpy's handler would invalidate the context before the
    # shutdown log line (and its /rosout copy) is written. Installed explicitly, so a node
    # started with SIGINT ignored (a `cmd &` from a script) still stops on it; SIGTERM
    # (ros2 launch's second step, docker stop, systemd) shuts down the same clean way.
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    try:
        node = node_class()
        node.start()
        node.announce()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ModelUnavailableError, ValueError) as exc:
        name = node_class.NODE_NAME if node is None else node.get_name()
        rclpy.logging.get_logger(name).fatal(f"cannot start: {exc}")
        return 1
    finally:
        # A second signal (ros2 launch's SIGTERM after SIGINT) must not cut the shutdown
        # short: it finishes the frame in progress, then logs the counters.
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)
        if node is not None:
            node.shutdown()
            node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
