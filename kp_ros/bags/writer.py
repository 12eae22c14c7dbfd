"""Writing rosbag2 bags for the bag tools, with ``rosbags`` (pure Python, no ROS).

- ``AtomicBagWriter``: writes beside the target and renames on success, so a failed run
  never leaves a half-written bag under the requested name.
- ``check_output_apart``: an output that would overwrite its own input is refused.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rosbags.rosbag2 import StoragePlugin, Writer

from kp_ros.bags.reader import BagError

STORAGES = ("sqlite3", "mcap")


def _storage_plugin(storage: str) -> StoragePlugin:
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}: use one of {', '.join(STORAGES)}")
    return StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3


class AtomicBagWriter:
    """A rosbags Writer (rosbag2 format 9) that builds the bag in a hidden directory
    beside ``path`` and moves it into place only when closed without error; on error
    (or Ctrl-C) the partial bag is deleted, so ``path`` is either complete or untouched.

    Use as a context manager. ``overwrite`` replaces an existing bag at ``path``.
    """

    def __init__(self, path: str | Path, storage: str = "sqlite3", overwrite: bool = False):
        self.path = Path(path)
        self.storage = storage
        self._plugin = _storage_plugin(storage)
        if self.path.exists() and not overwrite:
            raise BagError(f"output {str(self.path)!r} exists already (use --overwrite to replace it)")
        self.overwrite = overwrite
        self._tmpdir: Path | None = None
        self._writer: Writer | None = None
        self._connections: dict = {}

    def __enter__(self) -> AtomicBagWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent))
        self._writer = Writer(self._tmpdir / self.path.name, version=Writer.VERSION_LATEST,
                              storage_plugin=self._plugin)
        self._writer.open()
        return self

    def add_connection(self, topic: str, msgtype: str, typestore=None, msgdef: str | None = None,
                       rihs01: str | None = None, qos: Sequence = ()):
        """Register a topic once (definition from ``typestore``, or ``msgdef``+``rihs01``)."""
        key = (topic, msgtype)
        if key not in self._connections:
            self._connections[key] = self._writer.add_connection(
                topic, msgtype, typestore=typestore, msgdef=msgdef, rihs01=rihs01,
                offered_qos_profiles=list(qos))
        return self._connections[key]

    def write(self, connection, log_ns: int, data) -> None:
        self._writer.write(connection, int(log_ns), data)

    def __exit__(self, exc_type, exc, tb) -> bool:
        writer, self._writer = self._writer, None
        tmpdir, self._tmpdir = self._tmpdir, None
        try:
            if exc_type is None:
                writer.close()
                self._move_into_place(tmpdir / self.path.name)
            else:
                try:
                    writer.abort()
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return False

    def _move_into_place(self, built: Path) -> None:
        if self.path.exists() or self.path.is_symlink():
            if not self.overwrite:
                raise BagError(f"output {str(self.path)!r} appeared while writing; "
                               f"not overwriting it")
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
            os.replace(built, self.path)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(built, self.path)


def check_output_apart(input_path: str | Path, output_path: str | Path) -> None:
    """BagError unless ``output_path`` is apart from ``input_path``: not the same path, not
    inside it, not containing it, after resolving symlinks, ``.``/``..`` and a bare
    .db3/.mcap input file (its directory counts). An output is replaced with --overwrite,
    so any overlap would delete the input."""
    source = Path(input_path).resolve()
    target = Path(output_path).resolve()
    sources = {source, source.parent} if source.is_file() else {source}
    for path in sources:
        if target == path or target in path.parents or path in target.parents:
            relation = ("is" if target == path else "contains" if target in path.parents else "is inside")
            raise BagError(f"output {str(output_path)!r} {relation} the input {str(input_path)!r} "
                           f"({str(target)!r}): writing it would destroy the input; choose another output")
