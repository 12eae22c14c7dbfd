"""process_bags' inputs: the bags named or found below folders, their output names, and
their frame counts (for the progress bar)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from kp_ros.bags.reader import BagError, image_connections, open_bag

BAG_SUFFIXES = (".db3", ".mcap")


def is_bag(path: Path) -> bool:
    return (path.is_dir() and (path / "metadata.yaml").is_file()) or \
        (path.is_file() and path.suffix in BAG_SUFFIXES)


def find_bags(inputs, exclude: Path | None = None) -> list[Path]:
    """Bags named in ``inputs``, and every bag below the folders among them (a bag
    directory is not searched further; hidden entries, e.g. partial outputs, and
    ``exclude`` are skipped). BagError for an input that is neither."""
    exclude = exclude.resolve() if exclude else None
    found = []
    for entry in map(Path, inputs):
        if is_bag(entry):
            found.append(entry)
        elif entry.is_dir():
            for root, dirs, files in os.walk(entry):
                here = Path(root)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and (here / d).resolve() != exclude)
                if (here / "metadata.yaml").is_file():
                    found.append(here)
                    dirs.clear()
                    continue
                found += [here / f for f in sorted(files)
                          if f.endswith(BAG_SUFFIXES) and not f.startswith(".")]
        else:
            raise BagError(f"{str(entry)!r} is neither a bag nor a folder")
    return found


def bag_name(bag: Path) -> str:
    """The output name: the bag directory's name, or a bag file's name without suffix."""
    return bag.stem if bag.is_file() else bag.resolve().name


def remove_partials(out_dir: Path, names) -> None:
    """Partial outputs (AtomicBagWriter's hidden temp directories) of ``names``, left by a
    worker that was killed before it could delete them."""
    for name in names:
        for stale in out_dir.glob(f".{name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)


def count_frames(bag: Path, topic: str | None) -> int:
    """Frames of the bag's image topic (for the progress bar); 0 when the bag is unreadable
    (its task reports why)."""
    try:
        reader = open_bag(bag)
    except BagError:
        return 0
    try:
        return sum(c.msgcount for c in image_connections(reader, topic)[2])
    except BagError:
        return 0
    finally:
        reader.close()
