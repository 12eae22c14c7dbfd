"""replay_bag: publish a bag's image topic over ROS 2, without rosbag2 (rosbags + rclpy).

Publishes sensor_msgs/Image or CompressedImage (from the bag) at the recorded rate
(receive times), scaled by --rate-scale, or --as-fast-as-possible. The recorded bytes
are published as they are (serialized CDR), so stamps, encodings and data arrive
exactly as recorded, with no per-message conversion.

The topic is the bag's topic name; rename it with --output-topic or a ROS remap
(--ros-args -r /camera/image_raw:=/cam/image). QoS: reliable, keep last --qos-depth
(--best-effort for sensor-data style). With --wait-for-subscribers N it starts only
once N subscribers are matched, and it waits for reliable subscribers to acknowledge
the last messages before it exits, so every frame is delivered at the recorded rate.
(--as-fast-as-possible can outrun a slow subscriber: its keep-last queue then drops.)
With --clock [HZ] it also publishes /clock from the bag's receive times, as
``ros2 bag play --clock`` does, for nodes run with use_sim_time:=true.

    replay_bag tum.bag --rate-scale 0.5 --loop
    replay_bag tum.bag --clock   # + ros2 launch kp_ros matcher.launch.py use_sim_time:=true
    replay_bag tum.bag --as-fast-as-possible --wait-for-subscribers 2 \\
        --ros-args -r /camera/image_raw:=/camera/image
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from typing import Callable

from kp_ros.bags.messages import COMPRESSED_TYPE
from kp_ros.bags.reader import BagError, image_connections, iter_frames, open_bag
from kp_ros.core.signals import raise_interrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replay_bag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bag", help="rosbag2 bag (directory, or a .db3/.mcap file)")
    parser.add_argument("--topic", help="image topic in the bag (default: the bag's only image topic)")
    parser.add_argument("--output-topic", metavar="TOPIC",
                        help="publish under this name (default: the bag's topic name)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--rate-scale", type=float, default=1.0, metavar="X",
                      help="play X times the recorded speed (default %(default)s)")
    pace.add_argument("--as-fast-as-possible", action="store_true",
                      help="no pacing: publish each frame right after the previous one")
    parser.add_argument("--wait-for-subscribers", type=int, nargs="?", const=1, default=0, metavar="N",
                        help="start only when N subscribers are matched (N defaults to 1)")
    parser.add_argument("--wait-timeout", type=float, default=0.0, metavar="S",
                        help="give up waiting for subscribers after S seconds, exit 1 (0: wait forever)")
    parser.add_argument("--settle-time", type=float, default=0.5, metavar="S",
                        help="after the subscribers are matched, wait S s more so their side of "
                             "the discovery completes too and the first frame is not lost "
                             "(default %(default)s)")
    parser.add_argument("--loop", action="store_true", help="start over at the end (until Ctrl-C)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="publish only the first N frames")
    parser.add_argument("--best-effort", action="store_true", help="best-effort QoS instead of reliable")
    parser.add_argument("--qos-depth", type=int, default=10, metavar="N", help="history depth (default %(default)s)")
    parser.add_argument("--ack-timeout", type=float, default=5.0, metavar="S",
                        help="at the end, wait up to S s for reliable subscribers to acknowledge "
                             "(default %(default)s)")
    parser.add_argument("--clock", type=float, nargs="?", const=40.0, default=None, metavar="HZ",
                        help="publish /clock (rosgraph_msgs/Clock) from the bag's receive times: "
                             "at each frame and HZ times a second in between (default 40)")
    return parser


class BagClock:
    """Publishes /clock on the bag's time line: each frame's receive time as it goes out,
    and in between, at ``hz``, that time advanced by the scaled wall time since (never
    backwards, except when a --loop starts over)."""

    def __init__(self, publish: Callable[[int], None], hz: float, rate_scale: float | None):
        if not hz > 0:
            raise ValueError(f"--clock must be > 0 Hz, got {hz}")
        self._publish, self._period, self._scale = publish, 1.0 / hz, rate_scale or 0.0
        self._lock = threading.Lock()
        self._last: tuple[int, float] | None = None  # (bag ns, wall monotonic)
        self._published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay_bag_clock", daemon=True)
        self._thread.start()

    def frame(self, log_ns: int, restart: bool = False) -> None:
        with self._lock:
            if restart:
                self._published = 0
            self._last = (log_ns, time.monotonic())
            self._emit(log_ns)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)

    def _emit(self, ns: int) -> None:
        if ns >= self._published:
            self._published = ns
            self._publish(ns)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            with self._lock:
                if self._last is not None:
                    ns, wall = self._last
                    self._emit(ns + int((time.monotonic() - wall) * self._scale * 1e9))


class Pacer:
    """Sleeps so frame i goes out at (log_i - log_0) / rate_scale after the first one."""

    def __init__(self, rate_scale: float | None):
        if rate_scale is not None and not rate_scale > 0:
            raise ValueError(f"--rate-scale must be > 0, got {rate_scale}")
        self.rate_scale = rate_scale  # None: as fast as possible
        self._origin = None  # (wall monotonic, bag log_ns)

    def restart(self) -> None:
        self._origin = None

    def wait(self, log_ns: int) -> None:
        if self.rate_scale is None:
            return
        now = time.monotonic()
        if self._origin is None:
            self._origin = (now, log_ns)
            return
        due = self._origin[0] + (log_ns - self._origin[1]) / 1e9 / self.rate_scale
        if due > now:
            time.sleep(due - now)


def _clock_publisher(node) -> Callable[[int], None]:
    """publish(ns) on /clock, with the QoS ros2 bag play uses (keep last 1; reliable, which
    the best-effort /clock subscription of every node's time source accepts)."""
    from rclpy.time import Time
    from rosgraph_msgs.msg import Clock
    publisher = node.create_publisher(Clock, "/clock", 1)

    def publish(ns: int) -> None:
        publisher.publish(Clock(clock=Time(nanoseconds=ns).to_msg()))
    return publish


def _wait_for_subscribers(publisher, args, log) -> bool:
    """Wait until ``args.wait_for_subscribers`` match (then ``settle_time``); False on timeout."""
    log.info(f"waiting for {args.wait_for_subscribers} subscriber(s) on {publisher.topic_name}")
    deadline = time.monotonic() + args.wait_timeout if args.wait_timeout > 0 else None
    while publisher.get_subscription_count() < args.wait_for_subscribers:
        if deadline is not None and time.monotonic() > deadline:
            log.error(f"timed out: {publisher.get_subscription_count()} of "
                      f"{args.wait_for_subscribers} subscriber(s) after {args.wait_timeout} s")
            return False
        time.sleep(0.02)
    time.sleep(args.settle_time)
    return True


def _publish_frames(reader, connections, publisher, pacer, clock, args):
    """Publish the bag's frames paced (looping when asked, up to ``args.limit``); yields
    after each one so the caller's count is right even when interrupted."""
    published = 0
    while True:
        pacer.restart()
        restart = True
        for frame in iter_frames(reader, connections, "receive"):
            if args.limit is not None and published >= args.limit:
                break
            pacer.wait(frame.log_ns)
            if clock is not None:
                clock.frame(frame.log_ns, restart)
            restart = False
            publisher.publish(bytes(frame.data))
            published += 1
            yield published
        if not args.loop or published == 0 or (args.limit is not None and published >= args.limit):
            return


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import rclpy
    from rclpy.duration import Duration
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.signals import SignalHandlerOptions
    from rclpy.utilities import remove_ros_args

    args = build_parser().parse_args(remove_ros_args(["replay_bag"] + argv)[1:])
    try:
        pacer = Pacer(None if args.as_fast_as_possible else args.rate_scale)
        reader = open_bag(args.bag)
        topic, msgtype, connections = image_connections(reader, args.topic)
    except (BagError, ValueError) as err:
        print(f"replay_bag: error: {err}", file=sys.stderr)
        return 1
    if msgtype == COMPRESSED_TYPE:
        from sensor_msgs.msg import CompressedImage as message_class
    else:
        from sensor_msgs.msg import Image as message_class

    # Ctrl-C and SIGTERM end the loop through KeyboardInterrupt; rclpy's own handler
    # would shut the context down under a publish.
    rclpy.init(args=["replay_bag"] + argv, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGTERM, raise_interrupt)
    node = rclpy.create_node("replay_bag")
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=args.qos_depth,
                     durability=DurabilityPolicy.VOLATILE,
                     reliability=ReliabilityPolicy.BEST_EFFORT if args.best_effort
                     else ReliabilityPolicy.RELIABLE)
    publisher = node.create_publisher(message_class, args.output_topic or topic, qos)
    log = node.get_logger()
    clock = None
    if args.clock is not None:
        clock = BagClock(_clock_publisher(node), args.clock, pacer.rate_scale)
    published, code, started = 0, 0, None
    try:
        if args.wait_for_subscribers > 0 and not _wait_for_subscribers(publisher, args, log):
            return 1
        log.info(f"publishing {topic} ({msgtype}) from {args.bag} on {publisher.topic_name}, "
                 + ("as fast as possible" if pacer.rate_scale is None else f"x{pacer.rate_scale}"))
        started = time.monotonic()
        for _ in _publish_frames(reader, connections, publisher, pacer, clock, args):
            published += 1
        if not args.best_effort and published:
            publisher.wait_for_all_acked(Duration(seconds=args.ack_timeout))
    except KeyboardInterrupt:
        log.info("interrupted")
    except BagError as err:
        log.error(str(err))
        code = 1
    finally:
        elapsed = time.monotonic() - started if started else 0.0
        rate = published / elapsed if elapsed > 0 else 0.0
        print(f"replay_bag: published {published} frames on {publisher.topic_name} in "
              f"{elapsed:.1f} s ({rate:.1f} Hz)", flush=True)
        reader.close()
        if clock is not None:
            clock.stop()
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
