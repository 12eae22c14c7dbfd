"""A stand-in for somebody else's camera driver: publishes sensor_msgs/Image frames with
plain rclpy, and nothing of kp_ros's set-up. Tests and bench/bench_interop.py run it as a
separate process in a clean environment (no FASTDDS_* or other variables kp_ros sets),
as a camera driver or ``ros2 bag play`` started in another shell would be.

    python test/plain_camera.py --topic /cam/image_raw --rate 30 --count 600 \
        --width 640 --height 480 --reliability reliable [--listen /keypoints]

Waits (up to --wait s) for --subscribers matched subscriptions, then publishes; with
--listen it also records when each kp_ros/Keypoints for a published stamp arrives. Prints
one JSON line: sent, per-frame publish times and output arrival times (monotonic, s).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from rclpy.signals import SignalHandlerOptions
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image


def frame_bytes(height: int, width: int, index: int) -> bytes:
    """A textured rgb8 frame that moves by 2 px per index (matchable, cheap to make)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8 + 4, width // 8 + 4, 3), dtype=np.uint8)
    big = np.kron(base, np.ones((8, 8, 1), np.uint8))
    x = (2 * index) % 16
    return np.ascontiguousarray(big[:height, x:x + width]).tobytes()


def spin_until(node, deadline: float, done) -> None:
    """Spin ``node`` until ``deadline`` (monotonic s) or ``done()``, in slices of at most
    50 ms, so a SIGINT flag is read soon after it is set."""
    while (now := time.monotonic()) < deadline and not done():
        rclpy.spin_once(node, timeout_sec=min(0.05, deadline - now))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topic", default="/camera/image_raw")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--reliability", choices=("reliable", "best_effort"), default="reliable")
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--subscribers", type=int, default=1, help="matched subscriptions to wait for")
    parser.add_argument("--wait", type=float, default=60.0, help="max seconds to wait for them")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds after matching (discovery completes both ways)")
    parser.add_argument("--listen", default="", help="kp_ros/Keypoints topic to time outputs on")
    parser.add_argument("--linger", type=float, default=3.0, help="seconds to keep listening after")
    parser.add_argument("--first-stamp", type=int, default=1000, help="seconds of the first stamp")
    parser.add_argument("--stamps", default="", help="comma-separated whole-second stamps, one "
                                                     "per frame (may be bad, e.g. -5); sets --count")
    args = parser.parse_args(argv)
    stamps = [int(x) for x in args.stamps.split(",")] if args.stamps else None
    if stamps:
        args.count = len(stamps)

    # SIGINT ends the stream (a second one the listening after it), as a flag read between
    # rclpy calls: neither rclpy's context shutdown nor a KeyboardInterrupt raised inside
    # one of its calls, which can leave the executor or a handle in use and hang the exit.
    interrupts = []
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGINT, lambda signum, _frame: interrupts.append(signum))
    node = rclpy.create_node("plain_camera")
    reliability = (ReliabilityPolicy.RELIABLE if args.reliability == "reliable"
                   else ReliabilityPolicy.BEST_EFFORT)
    pub = node.create_publisher(Image, args.topic, QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=args.depth, reliability=reliability))
    arrivals: dict[str, float] = {}
    sizes: dict[str, int] = {}  # keypoints per output
    if args.listen:
        from kp_ros.msg import Keypoints

        def on_output(msg):
            key = f"{msg.header.stamp.sec}.{msg.header.stamp.nanosec:09d}"
            arrivals.setdefault(key, time.monotonic())
            sizes[key] = len(msg.x)
        node.create_subscription(Keypoints, args.listen, on_output, QoSProfile(
            depth=50, reliability=ReliabilityPolicy.RELIABLE))

    spin_until(node, time.monotonic() + args.wait,
               lambda: interrupts or pub.get_subscription_count() >= args.subscribers)
    matched = pub.get_subscription_count()
    spin_until(node, time.monotonic() + args.settle, lambda: interrupts)

    frames = [frame_bytes(args.height, args.width, i) for i in range(8)]
    published: dict[str, float] = {}
    period, start = 1.0 / args.rate, time.monotonic()

    def publish_one(i: int) -> None:
        msg = Image(height=args.height, width=args.width, encoding="rgb8", step=3 * args.width,
                    data=frames[i % len(frames)])
        msg.header.stamp = Time(sec=args.first_stamp + i // 1000, nanosec=(i % 1000) * 1_000_000)
        if stamps:
            msg.header.stamp = Time(sec=stamps[i], nanosec=0)
        msg.header.frame_id = "plain_camera"
        published[f"{msg.header.stamp.sec}.{msg.header.stamp.nanosec:09d}"] = time.monotonic()
        pub.publish(msg)

    for i in range(args.count):
        spin_until(node, start + i * period, lambda: interrupts)
        if interrupts:  # the result covers what was sent
            break
        publish_one(i)
    seconds = time.monotonic() - start
    spin_until(node, time.monotonic() + args.linger, lambda: len(interrupts) > 1)
    print(json.dumps({"sent": len(published), "matched": matched, "seconds": seconds,
                      "published": published, "arrivals": arrivals, "sizes": sizes}), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
