#!/usr/bin/env python3
"""Compare two bags message by message: per topic, the type, the count and every message's
serialized bytes. Exit 0 when identical. Used to check that a refactor changed no output:

    process_bag in.bag a.bag ... (at commit A);  process_bag in.bag b.bag ... (at commit B)
    python scripts/bag_diff.py a.bag b.bag
"""
from __future__ import annotations

import sys

from rosbags.rosbag2 import Reader


def topics(path: str) -> dict[str, tuple[str, list[bytes]]]:
    found = {}
    with Reader(path) as reader:
        for connection, _, data in reader.messages():
            entry = found.setdefault(connection.topic, (connection.msgtype, []))
            entry[1].append(bytes(data))
    return found


def main(argv=None) -> int:
    first, second = (argv or sys.argv[1:])[:2]
    a, b = topics(first), topics(second)
    same = True
    for topic in sorted(set(a) | set(b)):
        if topic not in a or topic not in b:
            print(f"{topic}: only in {first if topic in a else second}")
            same = False
            continue
        (type_a, msgs_a), (type_b, msgs_b) = a[topic], b[topic]
        differ = sum(x != y for x, y in zip(msgs_a, msgs_b)) + abs(len(msgs_a) - len(msgs_b))
        print(f"{topic}: {type_a} {len(msgs_a)} vs {type_b} {len(msgs_b)} messages, "
              f"{differ} differ")
        same &= type_a == type_b and differ == 0
    print("identical" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
