"""Node executables as subprocesses, as the launch file runs them: the command line, the
environment, stdout+stderr to a log file, a clean stop and the counters the node logs at
shutdown. The tests, the bench scripts, the soak run and kp_demo all start their nodes
here. Plain subprocess, no ROS import: what a node does is read back from its log.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

from kp_ros.ros.frame_worker import parse_summary

# A source checkout (package.xml beside kp_ros/): nodes started from it run its code, as
# the caller does; an installed copy (colcon, the venv) leaves PYTHONPATH alone.
SOURCE_ROOT = Path(__file__).resolve().parents[2]
IN_SOURCE_TREE = (SOURCE_ROOT / "package.xml").is_file()


def ros_value(value) -> str:
    """A parameter value as ``-p name:=value`` reads it (YAML): booleans lower-case."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def node_command(executable: str, params: Mapping | None = None, params_file: Path | None = None,
                 remaps: Mapping | None = None, namespace: str | None = None) -> list[str]:
    """``python -m kp_ros.nodes.<executable> --ros-args`` with the launch file's order: the
    parameters file, then per-node overrides, then remappings, then the namespace."""
    cmd = [sys.executable, "-m", f"kp_ros.nodes.{executable}", "--ros-args"]
    if params_file is not None:
        cmd += ["--params-file", str(params_file)]
    for name, value in (params or {}).items():
        cmd += ["-p", f"{name}:={ros_value(value)}"]
    for src, dst in (remaps or {}).items():
        cmd += ["-r", f"{src}:={dst}"]
    if namespace:
        cmd += ["-r", f"__ns:={namespace}"]
    return cmd


def node_env(base: Mapping | None = None, *, source_root: Path | None = SOURCE_ROOT if IN_SOURCE_TREE else None,
             domain_id: int | None = None, threads: int | None = None, extra: Mapping | None = None) -> dict:
    """The environment of a node process: ``base`` (default: this process's) with output
    unbuffered (its log is complete even if it is killed), HOME and ROS_LOG_DIR set (rcl
    cannot log without them), ``source_root`` first on PYTHONPATH, an explicit
    ``domain_id``, and ``threads`` capping torch's OpenMP/MKL threads."""
    env = dict(os.environ if base is None else base)
    if source_root is not None:
        paths = env.get("PYTHONPATH", "").split(os.pathsep) if env.get("PYTHONPATH") else []
        if not paths or paths[0] != str(source_root):
            env["PYTHONPATH"] = os.pathsep.join([str(source_root), *paths])
    env.setdefault("HOME", "/tmp")
    env.setdefault("ROS_LOG_DIR", os.path.join(env["HOME"], ".ros", "log"))
    env["PYTHONUNBUFFERED"] = "1"
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env


class NodeProcess(subprocess.Popen):
    """A running node whose stdout+stderr go to ``log_path`` (a kept temporary file when
    None); ``stop()`` ends it as Ctrl-C and ``ros2 launch`` do."""

    def __init__(self, command: list[str], log_path: Path | None = None, env: Mapping | None = None,
                 cwd: Path | None = None):
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="kp_ros_node_", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.interrupted = False
        with open(self.log_path, "w") as log:
            super().__init__(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)

    def interrupt(self) -> None:
        """SIGINT once: a second one would interrupt the node's own shutdown."""
        if self.poll() is None and not self.interrupted:
            self.send_signal(signal.SIGINT)
            self.interrupted = True

    def stop(self, timeout: float = 30.0) -> tuple[int, str]:
        """SIGINT, up to ``timeout`` s for a clean exit, then SIGKILL; (exit code, log text)."""
        self.interrupt()
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
        return self.returncode, self.log_text()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_node(executable: str, log_path: Path | None = None, *, params: Mapping | None = None,
               params_file: Path | None = None, remaps: Mapping | None = None, namespace: str | None = None,
               env: Mapping | None = None, cwd: Path | None = None) -> NodeProcess:
    """kp_ros.nodes.<executable> in a process of its own; ``env`` defaults to node_env()."""
    return NodeProcess(node_command(executable, params, params_file, remaps, namespace), log_path,
                       node_env() if env is None else env, cwd)


def stop_nodes(processes: Iterable[NodeProcess], timeout: float = 30.0) -> list[tuple[int, str]]:
    """Stop several nodes at once (all interrupted first, so their shutdowns overlap)."""
    processes = list(processes)
    for process in processes:
        process.interrupt()
    return [process.stop(timeout) for process in processes]


def parse_counters(log: str) -> dict[str, int] | None:
    """{received, processed, dropped, rejected} of the node's last counters line (the
    shutdown line 'shutting down: received=.. processed=.. dropped=.. rejected=..'),
    or None when it logged none."""
    return parse_summary(log)


def shutdown_summary(log: str) -> str | None:
    """The text after 'shutting down: ' on the node's shutdown line, or None."""
    return next((line.split("shutting down: ", 1)[1].strip() for line in log.splitlines()
                 if "shutting down: " in line), None)


def memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc/PID/status."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[:5]] = int(line.split()[1]) / 1024.0
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))
