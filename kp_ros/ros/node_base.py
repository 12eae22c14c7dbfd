"""What every kp_ros node shares: parameters declared from the specs, validated in on_set
and applied in post_set, /diagnostics, throttled reject logging, the debug-image decision,
and a clean start and shutdown (``run_node``).

Parameters follow rclpy's own demos: the on_set callback only decides (no side effects), so
a change rejected by any callback changes nothing; the post_set callback applies what was
accepted. Which names may change at runtime comes from ``ParamSpec.runtime``.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import fields

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import Image

from kp_ros.core.device_errors import EXIT_DEVICE_FAILED
from kp_ros.core.model_loading import ModelUnavailableError
from kp_ros.core.params import ParamSpec
from kp_ros.core.signals import interrupts_raised
from kp_ros.ros.parent_watch import watch_parent
from kp_ros.ros.conversions import array_to_image_msg
from kp_ros.ros.diagnostics import diagnostic_array
from kp_ros.ros.qos import output_qos

REJECT_LOG_PERIOD = 1.0  # s between two "rejected" log lines (the counter has them all)


class StartupError(Exception):
    """A node cannot start (invalid parameter, unusable device): one FATAL line, exit 1."""


class Param(ParamSpec):
    """A kp_ros.core.params.ParamSpec that can build its ROS ParameterDescriptor."""

    @classmethod
    def of(cls, spec: ParamSpec) -> "Param":
        return cls(**{f.name: getattr(spec, f.name) for f in fields(ParamSpec)})

    def descriptor(self) -> ParameterDescriptor:
        text = self.description + (f" One of: {', '.join(self.choices)}." if self.choices else "")
        desc = ParameterDescriptor(description=text, dynamic_typing=self.normalize is not None,
                                   read_only=False)
        if self.low is not None and not isinstance(self.default, bool):
            if isinstance(self.default, int):
                desc.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high),
                                                   step=1)]
            elif isinstance(self.default, float):
                desc.floating_point_range = [FloatingPointRange(
                    from_value=float(self.low), to_value=float(self.high), step=0.0)]
        return desc


def ros_params(specs) -> tuple[Param, ...]:
    return tuple(Param.of(spec) for spec in specs)


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
            value = spec.checked(param.value)
        except ValueError as exc:
            return {}, str(exc)
        if not spec.runtime and value != values[param.name]:
            return {}, (f"{param.name} cannot change while running: restart the node "
                        f"(ros2 launch / ros2 run) with the new value")
        changes[param.name] = value
    return changes, None


class NodeBase(Node):
    """Subclasses set ``NODE_NAME`` and ``SPECS`` and may override ``check_params``
    (raise ValueError to reject, no side effects), ``apply_params``, ``start``,
    ``announce`` and ``shutdown``."""

    NODE_NAME = "kp_ros_node"
    SPECS: tuple[ParamSpec, ...] = ()

    def __init__(self, **kwargs):
        super().__init__(self.NODE_NAME, **kwargs)
        self._params = {p.name: p for p in ros_params(self.SPECS)}
        for p in self._params.values():
            self.declare_parameter(p.name, p.default, p.descriptor())
        self.values = {}
        for name, spec in self._params.items():
            try:
                self.values[name] = spec.checked(self.get_parameter(name).value)
            except ValueError as exc:
                raise StartupError(str(exc)) from None
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._post_set_parameters)
        self._debug_pub = self.create_publisher(Image, "~/debug_image", output_qos())
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._last_reject_log = 0.0

    # --- for subclasses -------------------------------------------------------------
    def check_params(self, changes: dict) -> None:
        """Raise ValueError with the reason to reject ``changes``; no side effects."""

    def apply_params(self, changes: dict) -> None:
        """Apply accepted changes (``self.values`` already holds them)."""

    def start(self) -> None:
        """Subscribe and start timers, once the whole node is built."""

    def announce(self) -> None:
        """The start-up line."""

    def shutdown(self) -> None:
        """Finish the work in progress and log the counters."""

    # --- shared machinery -----------------------------------------------------------
    def debug_wanted(self) -> bool:
        return self.values.get("debug_image", False) or self._debug_pub.get_subscription_count() > 0

    def publish_debug(self, image_rgb, header) -> None:
        self._debug_pub.publish(array_to_image_msg(image_rgb, "rgb8", header))

    def publish_diagnostics(self, what: str, hardware_id: str, values: dict,
                            warning: str | None = None) -> None:
        self._diag_pub.publish(diagnostic_array(self, what, hardware_id, values, warning))

    def log_rejected(self, text: str) -> None:
        """One ERROR line per REJECT_LOG_PERIOD at most (by hand: rclpy's
        throttle_duration_sec needs a ROS clock tick)."""
        now = time.monotonic()
        if now - self._last_reject_log < REJECT_LOG_PERIOD:
            return
        self._last_reject_log = now
        self.get_logger().error(text)

    def _on_set_parameters(self, params) -> SetParametersResult:
        changes, reason = parameter_changes(self._params, self.values, params)
        if reason is None:
            try:
                self.check_params(changes)
            except ValueError as exc:
                reason = str(exc)
        return SetParametersResult(successful=reason is None, reason=reason or "")

    def _post_set_parameters(self, params) -> None:
        changes, _ = parameter_changes(self._params, self.values, params)
        self.values.update(changes)
        self.apply_params(changes)


def run_node(node_class, args=None) -> int:
    """main() body shared by the node executables: init, spin, clean shutdown on SIGINT
    and SIGTERM (ros2 launch's second step, docker stop, systemd).

    A node that cannot start (weights missing, invalid parameter) logs one FATAL line and
    exits 1; an unexpected error while starting is logged with its traceback, exit 1."""
    with interrupts_raised() as restore:
        # Our own signal handling: rclpy's would invalidate the context before the shutdown
        # line (and its /rosout copy) is written.
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        node, running, code = None, False, 0
        try:
            node = node_class()
            node.start()
            node.announce()
            running = True
            watch_parent(lambda pid: node.get_logger().warning(
                f"parent process {pid} is gone (ros2 launch stopped by SIGTERM or killed): "
                f"shutting down"))
            failed = getattr(node, "device_failed", None)  # a FeatureNode's sticky CUDA error
            if failed is None:
                rclpy.spin(node)
            else:
                rclpy.spin_until_future_complete(node, failed)
                code = EXIT_DEVICE_FAILED if failed.done() else 0
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        except (ModelUnavailableError, StartupError) as exc:
            _logger(node_class, node).fatal(f"cannot start: {exc}")
            return 1
        except Exception:  # noqa: BLE001 - a bug, not bad input: say where
            when = "stopped by an error while running" if running else "failed while starting"
            _logger(node_class, node).fatal(f"{when}: {traceback.format_exc()}")
            return 1
        finally:
            # A second signal (ros2 launch's SIGTERM after SIGINT) must not cut the shutdown
            # short: it finishes the frame in progress, then logs the counters.
            restore(ignore=True)
            if node is not None:
                node.shutdown()
                node.destroy_node()
            if rclpy.ok():
                rclpy.try_shutdown()
    return code


def _logger(node_class, node):
    return rclpy.logging.get_logger(node_class.NODE_NAME if node is None else node.get_name())
