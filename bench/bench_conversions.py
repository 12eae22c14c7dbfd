"""Time numpy <-> message conversion: a 2000x256 Keypoints, 2000 Matches, a 640x480 Image.

    python bench/bench_conversions.py [--runs 200]

Prints a markdown table (median / p95 in ms); compares against the naive fill
(assigning numpy arrays to the message fields), which rosidl copies element by element.
"""
import argparse
import statistics
import time

import numpy as np
from builtin_interfaces.msg import Time
from std_msgs.msg import Header

from kp_ros.msg import Keypoints
from kp_ros.ros.conversions import (array_to_image_msg, image_msg_to_model_input, keypoints_from_msg,
                                    keypoints_to_msg, matches_from_msg, matches_to_msg)


def timed(fn, runs):
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def naive_fill(header, kp, scores, desc):
    msg = Keypoints(header=header, height=480, width=640, detector="x", descriptor_size=256)
    msg.x, msg.y, msg.scores, msg.descriptors = kp[:, 0], kp[:, 1], scores, desc.ravel()
    return msg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    n = 2000
    kp = rng.random((n, 2), dtype=np.float32) * 640
    scores = rng.random(n, dtype=np.float32)
    desc = rng.standard_normal((n, 256), dtype=np.float32)
    header = Header(stamp=Time(sec=1), frame_id="cam")
    kp_msg = keypoints_to_msg(header, 480, 640, "x", kp, scores, desc)
    m_msg = matches_to_msg(header, Time(), "cam", 480, 640, "x", kp, kp, scores, np.ones(n, np.uint8))
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    img_msg = array_to_image_msg(image, "bgr8")
    rows = [
        ("Keypoints 2000x256: fill from numpy (kp_ros)",
         lambda: keypoints_to_msg(header, 480, 640, "x", kp, scores, desc)),
        ("Keypoints 2000x256: read back to numpy (kp_ros)", lambda: keypoints_from_msg(kp_msg)),
        ("Keypoints 2000x256: naive fill (numpy -> field)", lambda: naive_fill(header, kp, scores, desc)),
        ("Matches 2000 (+inliers): fill",
         lambda: matches_to_msg(header, Time(), "c", 480, 640, "x", kp, kp, scores, np.ones(n, np.uint8))),
        ("Matches 2000: read back", lambda: matches_from_msg(m_msg)),
        ("Image 640x480 rgb8: fill from numpy", lambda: array_to_image_msg(image, "rgb8")),
        ("Image 640x480 bgr8: decode to RGB model input", lambda: image_msg_to_model_input(img_msg)),
    ]
    print(f"| conversion ({args.runs} runs) | median ms | p95 ms |\n|---|---|---|")
    for name, fn in rows:
        runs = max(5, args.runs // 20) if "naive" in name else args.runs
        median, p95 = timed(fn, runs)
        print(f"| {name} | {median:.3f} | {p95:.3f} |")


if __name__ == "__main__":
    main()
