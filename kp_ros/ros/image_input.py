"""The image subscription of a feature node: QoS that connects to whatever publishes, and
a clear warning when nothing arrives.

``reliable_input: auto`` (the default) does what ``ros2 topic echo`` and ``ros2 bag
record`` do: the subscription is created once publishers are seen, reliable when every
publisher on the topic is reliable (retransmission makes full frames arrive: a reliable
640x480 stream over the default transports loses none, a best-effort one ~40 %), best
effort otherwise (a best-effort camera still connects). It follows later changes of the
publisher set. ``reliable`` / ``best_effort`` fix the choice.

When no publisher has matched for a few seconds, or a publisher with incompatible QoS
appears, one warning names the topic, the expected type and the likely cause; it is
repeated rarely and shown on /diagnostics (``problem``) until frames can flow.

Frames the middleware reports lost (the subscription's message-lost event: Fast DDS
raises it for sequence-number gaps, e.g. a best-effort frame missing a UDP fragment) are
counted in ``lost`` (over every subscription this input had), which /diagnostics shows
beside received / dropped / rejected.
"""
from __future__ import annotations

import time

from rclpy.event_handler import SubscriptionEventCallbacks, UnsupportedEventTypeError
from rclpy.qos import QoSPolicyKind, ReliabilityPolicy

from kp_ros.core.params import normalize_reliability
from kp_ros.ros.qos import image_input_qos

# Over the default transports a best-effort stream of full frames loses many in transport
# (one lost UDP fragment loses the frame); the camera-side profile keeps the transports
# (discovery with every default participant intact) and sizes the buffers for frames.
CAMERA_PROFILE_HINT = (
    "; a best-effort camera of full frames loses many over the default transports: start the "
    "camera with FASTDDS_DEFAULT_PROFILES_FILE=<kp_ros share>/config/fastdds/"
    "camera_large_frames.xml (docs/qos.md)")
POLL_PERIOD = 0.25     # s between looks at the ROS graph (a local cache: microseconds)
WARN_AFTER = 5.0       # s without a matched publisher before the first warning
WARN_REPEAT = 60.0     # s between repeats of an unchanged warning


class ImageInput:
    """Owns the subscription; ``callback(msg)`` gets every frame."""

    def __init__(self, node, msg_type, topic: str, reliability: str, callback,
                 warn_after: float = WARN_AFTER, warn_repeat: float = WARN_REPEAT):
        self._node, self._msg_type, self._callback = node, msg_type, callback
        self.topic = node.resolve_topic_name(topic)
        self.mode = normalize_reliability(reliability)
        self.reliable: bool | None = None  # of the current subscription; None: none yet
        self.subscription = None
        self.problem: str | None = None    # why frames cannot arrive, while that is so
        self._warn_after, self._warn_repeat = warn_after, warn_repeat
        self._since = time.monotonic()  # start, or the last (re)subscription: a grace period
        self._warned: tuple[str | None, float] = (None, 0.0)  # (text, when)
        self._incompatible: str | None = None
        self.lost = 0  # frames the middleware reported lost
        self.lost_counted = True  # False where the RMW has no message-lost event
        if self.mode != "auto":
            self._subscribe(self.mode == "reliable", f"reliable_input: {self.mode}")
        self._timer = node.create_timer(POLL_PERIOD, self._poll)

    @property
    def type_name(self) -> str:
        return f"{self._msg_type.__module__.split('.')[0]}/msg/{self._msg_type.__name__}"

    def describe_qos(self) -> str:
        if self.reliable is None:
            return "QoS auto: waiting for a publisher"
        return f"{'reliable' if self.reliable else 'best-effort'} QoS" + (
            " (auto)" if self.mode == "auto" else "")

    def matched_publishers(self) -> int:
        return self.subscription.get_publisher_count() if self.subscription is not None else 0

    # --- internals ------------------------------------------------------------------
    def _subscribe(self, reliable: bool, why: str) -> None:
        if self.subscription is not None:
            self._node.destroy_subscription(self.subscription)
        self.subscription = self._create_subscription(reliable)
        self.reliable = reliable
        self._incompatible = None
        self._since = time.monotonic()
        self._node.get_logger().info(
            f"subscribed to {self.topic} ({self.type_name}) with {self.describe_qos()}: {why}"
            + ("" if reliable or self._msg_type.__name__ != "Image" else CAMERA_PROFILE_HINT))

    def _create_subscription(self, reliable: bool):
        """With the message-lost event where the RMW offers it (rmw_fastrtps does; rclpy
        raises UnsupportedEventTypeError where not: then ``lost`` stays 0)."""
        for lost in (self._on_message_lost, None):
            events = SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_qos,
                                                message_lost=lost)
            try:
                return self._node.create_subscription(
                    self._msg_type, self.topic, self._callback, image_input_qos(reliable),
                    event_callbacks=events)
            except UnsupportedEventTypeError:
                self.lost_counted = False
        raise AssertionError("unreachable")

    def _poll(self) -> None:
        found = self._node.get_publishers_info_by_topic(self.topic)
        publishers = [p for p in found if p.topic_type == self.type_name]
        if self.mode == "auto" and publishers:
            reliable = all(p.qos_profile.reliability == ReliabilityPolicy.RELIABLE for p in publishers)
            if reliable != self.reliable:
                kinds = "reliable" if reliable else "best-effort or mixed"
                self._subscribe(reliable, f"{len(publishers)} {kinds} publisher(s)")
        if self._incompatible is not None and not any(self._offends(p) for p in publishers):
            self._incompatible = None  # the offending publisher left: judge afresh
        if self.matched_publishers() and self._incompatible is None:
            if self.problem is not None:
                self._node.get_logger().info(f"input on {self.topic}: publisher matched, frames can flow")
            self.problem = None
            return
        if self._incompatible is None and time.monotonic() - self._since < self._warn_after:
            return  # discovery takes time; a new subscription gets a grace period too
        self.problem = self._incompatible or self._diagnose(publishers, found)
        self._warn(self.problem)

    def _on_message_lost(self, info) -> None:
        self.lost += int(info.total_count_change)

    def _on_incompatible_qos(self, info) -> None:
        if self.mode == "auto":
            return  # the next poll follows the publishers; a lasting mismatch is diagnosed there
        policy = QoSPolicyKind(info.last_policy_kind).name
        ours = "reliable" if self.reliable else "best effort"
        self._incompatible = (
            f"a publisher on {self.topic} offers QoS incompatible with this subscription "
            f"({policy}; this node subscribes {ours}, reliable_input: {self.mode}): no frames "
            f"from it. A best-effort camera needs reliable_input: auto or best_effort.")
        self.problem = self._incompatible
        self._warn(self.problem)

    def _offends(self, publisher) -> bool:
        """Whether this publisher cannot match the fixed reliability we subscribe with."""
        return bool(self.reliable) and publisher.qos_profile.reliability != ReliabilityPolicy.RELIABLE

    def _warn(self, text: str) -> None:
        now = time.monotonic()
        last_text, last_time = self._warned
        if text == last_text and now - last_time < self._warn_repeat:
            return
        self._warned = (text, now)
        self._node.get_logger().warning(text)

    def _others_publish(self, topic: str) -> bool:
        return any(p.node_name != self._node.get_name() or p.node_namespace != self._node.get_namespace()
                   for p in self._node.get_publishers_info_by_topic(topic))

    def _diagnose(self, publishers, found) -> str:
        """The likeliest reason nothing matched, from what the ROS graph shows (topics
        listed there may have only subscribers, this node's own among them)."""
        head = f"no frames can arrive on {self.topic} (expects {self.type_name}): "
        if publishers:  # same type, seen, yet not matched
            return head + (f"{len(publishers)} publisher(s) seen but none matched: QoS incompatible "
                           f"(reliable_input: {self.mode})")
        if found:
            kinds = sorted({p.topic_type for p in found})
            return head + (f"it is published as {', '.join(kinds)}; remap image to a "
                           f"{self.type_name} topic (launch: image_topic:=..., use_compressed)")
        compressed = self.topic.endswith("/compressed")
        sibling = self.topic[:-len("/compressed")] if compressed else self.topic + "/compressed"
        if self._node.get_publishers_info_by_topic(sibling):
            return head + (f"{sibling} is published: set use_compressed:="
                           f"{'false' if compressed else 'true'}")
        types = self._node.get_topic_names_and_types()
        images = sorted(name for name, kinds in types
                        if any(kind.startswith("sensor_msgs/msg/") and "Image" in kind for kind in kinds)
                        and name != self.topic and self._others_publish(name))
        seen = f" Image topics seen: {', '.join(images[:5])}." if images else ""
        return head + ("no publisher. Check the remapping (image_topic:=...), ROS_DOMAIN_ID, and "
                       "that every process uses the same Fast DDS transports "
                       "(FASTDDS_BUILTIN_TRANSPORTS set alike on all, or on none)." + seen)
