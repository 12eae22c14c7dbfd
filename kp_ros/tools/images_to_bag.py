"""images_to_bag: a folder of images -> a rosbag2 bag of sensor_msgs Image or CompressedImage.

Stamps come from the file names when they are times in seconds (TUM style:
``1341847980.722988.png``), or from ``--rate``. The bag's receive time of each message
equals its stamp. No ROS install needed (rosbags).

    images_to_bag ../shared/data/tum_fr3_long_office_household tum.bag
    images_to_bag frames/ out.bag --rate 30 --encoding mono8 --storage mcap
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import cv2
import numpy as np

from kp_ros.bags.messages import (COMPRESSED_TYPE, IMAGE_TYPE, compressed_image_msg,
                                  header_msg, image_msg, kp_ros_typestore)
from kp_ros.bags.reader import BagError
from kp_ros.bags.writer import STORAGES, AtomicBagWriter, check_output_apart

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ENCODINGS = ("rgb8", "bgr8", "mono8")
_STAMP_NAME = re.compile(r"(\d+)(?:\.(\d{1,9}))?")
# Bare integer names below this (~3 years of seconds since 1970) are frame numbers, not
# times: no camera clock stamps 250.png at 250 s after the epoch.
FRAME_INDEX_LIMIT = 100_000_000


def stamp_from_name(path: str | Path) -> int | None:
    """Nanoseconds from a file name that is a time in seconds ('1341847980.722988.png'),
    parsed as a decimal (no float rounding); None for any other name."""
    match = _STAMP_NAME.fullmatch(Path(path).stem)
    if match is None:
        return None
    seconds, fraction = match.groups()
    return int(seconds) * 1_000_000_000 + int((fraction or "0").ljust(9, "0"))


def list_images(folder: Path) -> list[Path]:
    """The folder's images in name order; frame-index names in numeric order (9 before 10)."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    indices = frame_indices(paths) if paths else None
    return paths if indices is None else [p for _, p in sorted(zip(indices, paths))]


def frame_indices(paths: list[Path]) -> list[int] | None:
    """The names as frame numbers ('250.png', '0007.png'), or None when they are not: a
    name with a fraction or a value of FRAME_INDEX_LIMIT or more is taken as a time."""
    matches = [_STAMP_NAME.fullmatch(p.stem) for p in paths]
    if any(m is None or m.group(2) is not None for m in matches):
        return None
    indices = [int(m.group(1)) for m in matches]
    return indices if max(indices) < FRAME_INDEX_LIMIT else None


def frame_stamps(paths: list[Path], rate: float | None, start: float | None) -> tuple[list[int], str]:
    """Stamps (ns) of the frames and a line saying how they were chosen:
    ``start + i / rate`` with --rate, else from the names (times in seconds)."""
    indices = frame_indices(paths)
    if indices is not None and rate is None:
        raise BagError(f"the file names look like frame indices, not times in seconds "
                       f"({', '.join(p.name for p in paths[:3])}, ...): stamping them as seconds "
                       f"would space the frames seconds apart; give --rate HZ (and --start SECONDS)")
    if rate is not None:
        if rate <= 0:
            raise BagError(f"--rate must be > 0, got {rate}")
        first = None if indices is not None else stamp_from_name(paths[0])
        first = round(start * 1e9) if start is not None else (first or 0)
        how = "frame indices in the names, " if indices is not None else ""
        return ([first + round(i * 1e9 / rate) for i in range(len(paths))],
                f"stamps: {how}{rate:g} Hz from {first / 1e9:.9f} s in name order")
    stamps = [stamp_from_name(p) for p in paths]
    unnamed = [p.name for p, s in zip(paths, stamps) if s is None]
    if unnamed:
        raise BagError(f"{len(unnamed)} file name(s) are not times in seconds (e.g. {unnamed[0]!r}); "
                       f"give --rate HZ to stamp the frames in name order instead")
    return stamps, "stamps: times in seconds from the file names"


def convert(image_rgb: np.ndarray, encoding: str) -> np.ndarray:
    """An RGB uint8 image in the channel layout of ``encoding``."""
    if encoding == "rgb8":
        return image_rgb
    if encoding == "bgr8":
        return np.ascontiguousarray(image_rgb[:, :, ::-1])
    if encoding == "mono8":
        return cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    raise ValueError(f"unknown encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise BagError(f"cannot read image {str(path)!r}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def images_to_bag(folder: str | Path, output: str | Path, topic: str = "/camera/image_raw",
                  frame_id: str = "camera", encoding: str = "rgb8", compressed: str | None = None,
                  rate: float | None = None, start: float | None = None, storage: str = "sqlite3",
                  limit: int | None = None, jpeg_quality: int = 95, overwrite: bool = False) -> int:
    """Write the folder's images to ``output``; returns the number of frames written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BagError(f"{str(folder)!r} is not a directory")
    check_output_apart(folder, output)
    paths = list_images(folder)
    if not paths:
        raise BagError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {str(folder)!r}")
    stamps, how = frame_stamps(paths, rate, start)
    print(f"images_to_bag: {how}")
    frames = sorted(zip(stamps, paths))[:limit]
    typestore = kp_ros_typestore()
    msgtype = COMPRESSED_TYPE if compressed else IMAGE_TYPE
    with AtomicBagWriter(output, storage, overwrite) as writer:
        connection = writer.add_connection(topic, msgtype, typestore=typestore)
        for stamp_ns, path in frames:
            header = header_msg(typestore, stamp_ns, frame_id)
            image = convert(read_rgb(path), encoding)
            if compressed:
                params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if compressed == "jpeg" else []
                # cv2 encodes BGR; convert() gave the requested layout, so undo it for color.
                ok, data = cv2.imencode(f".{compressed}", image if image.ndim == 2 or encoding == "bgr8"
                                        else image[:, :, ::-1], params)
                if not ok:
                    raise BagError(f"cannot encode {path.name} as {compressed}")
                msg = compressed_image_msg(typestore, data.tobytes(), compressed, header)
            else:
                msg = image_msg(typestore, image, encoding, header)
            writer.write(connection, stamp_ns, typestore.serialize_cdr(msg, msgtype))
    return len(frames)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="images_to_bag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of .png/.jpg images")
    parser.add_argument("output", help="rosbag2 bag directory to create")
    parser.add_argument("--topic", default="/camera/image_raw", help="image topic (default %(default)s)")
    parser.add_argument("--frame-id", default="camera", help="header.frame_id (default %(default)s)")
    parser.add_argument("--encoding", choices=ENCODINGS, default="rgb8",
                        help="sensor_msgs/Image encoding (default %(default)s)")
    parser.add_argument("--compressed", choices=("jpeg", "png"), default=None,
                        help="write sensor_msgs/CompressedImage in this format instead of Image "
                             "(the topic is then usually .../compressed); --encoding mono8 "
                             "makes it grayscale")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality (default %(default)s)")
    parser.add_argument("--rate", type=float, default=None, metavar="HZ",
                        help="stamp frames at this rate in name order instead of parsing "
                             "times from the file names")
    parser.add_argument("--start", type=float, default=None, metavar="SECONDS",
                        help="stamp of the first frame with --rate (default: its name's time, else 0)")
    parser.add_argument("--storage", choices=STORAGES, default="sqlite3",
                        help="rosbag2 storage format (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="write only the first N frames")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output bag")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        count = images_to_bag(args.folder, args.output, args.topic, args.frame_id, args.encoding,
                              args.compressed, args.rate, args.start, args.storage, args.limit,
                              args.jpeg_quality, args.overwrite)
    except (BagError, ValueError) as err:
        print(f"images_to_bag: error: {err}", file=sys.stderr)
        return 1
    kind = f"CompressedImage ({args.compressed})" if args.compressed else f"Image ({args.encoding})"
    print(f"wrote {count} frames as sensor_msgs/{kind} on {args.topic} to {args.output} ({args.storage})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
