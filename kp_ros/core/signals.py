"""SIGINT and SIGTERM as KeyboardInterrupt, for the nodes and the command-line tools.

Ctrl-C, ``kill -TERM``, ``docker stop`` and systemd then all take the same clean path
(finish or discard the work in progress, log the counters, exit). Set explicitly, so a
process started with SIGINT ignored (a ``cmd &`` from a script) still stops on it.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def interrupts_raised(signals=STOP_SIGNALS):
    """SIGINT / SIGTERM raise KeyboardInterrupt inside the block; the handlers that were
    there are restored at its end. Yields ``restore(ignore=False)``: called with
    ``ignore=True`` (e.g. at the start of a shutdown), further signals are ignored until
    the block ends, so a second signal cannot cut a clean shutdown short."""
    previous = {signum: signal.signal(signum, raise_interrupt) for signum in signals}

    def restore(ignore: bool = False) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if ignore else handler)

    try:
        yield restore
    finally:
        restore()


@contextmanager
def interrupts_held():
    """SIGINT and SIGTERM held until the block ends, then raised as KeyboardInterrupt.

    A KeyboardInterrupt raised while torch's C++ code is running Python (its import, a
    model's construction) does not unwind: pybind11 calls std::terminate and the process
    dies with SIGABRT. Holding the signal for those seconds keeps Ctrl-C a clean
    'interrupted'."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (e.g. a Ray worker thread)
        return
    held = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        raise KeyboardInterrupt
