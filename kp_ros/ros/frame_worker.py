"""Keep-latest hand-off from a subscription callback to one inference thread.

The callback never waits for inference: it drops the frame into a one-slot mailbox
and returns. If the worker is still busy when the next frame arrives, the older
waiting frame is overwritten and counted as dropped. Every received frame ends up in
exactly one of processed / dropped / rejected, so ``received == processed + dropped
+ rejected + pending`` holds at any instant, and with ``pending == 0`` after ``stop``.
"""
from __future__ import annotations

import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable


class FrameRejected(Exception):
    """Raised by a frame handler for input it cannot process; the message is the reason."""


@dataclass
class FrameCounts:
    received: int = 0
    processed: int = 0
    dropped: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)  # rejected frames, by reason

    def summary(self) -> str:
        text = (f"received={self.received} processed={self.processed} "
                f"dropped={self.dropped} rejected={self.rejected}")
        if self.reasons:
            text += " (" + "; ".join(f"{n}x {r}" for r, n in self.reasons.most_common(5)) + ")"
        return text


def reason_key(reason: str) -> str:
    """Rejections are grouped by the text before the first colon (the kind, not the details)."""
    return reason.split(":")[0][:80]


_SUMMARY = re.compile(r"received=(\d+) processed=(\d+) dropped=(\d+) rejected=(\d+)")


def parse_summary(text: str) -> dict[str, int] | None:
    """The counters of the last ``FrameCounts.summary()`` in ``text`` (e.g. a node's log,
    whose shutdown line carries it), or None when there is none."""
    found = _SUMMARY.findall(text)
    if not found:
        return None
    return dict(zip(("received", "processed", "dropped", "rejected"), map(int, found[-1])))


class LatestFrameWorker:
    """Runs ``handler(item)`` on a background thread for the newest submitted item.

    ``handler`` returns normally (processed), raises FrameRejected (bad input) or any
    other exception (a failure inside processing, e.g. CUDA out of memory): both count
    as rejected and go to ``on_reject(item, reason, exc)``; the worker lives on. An
    exception for which ``is_fatal(exc)`` holds (a sticky CUDA error: every later frame
    would fail too) is counted the same way, then the worker stops (later frames count
    as dropped), keeps it in ``fatal`` and calls ``on_fatal(exc)`` so the process can exit.
    """

    def __init__(self, handler: Callable[[Any], None],
                 on_reject: Callable[[Any, str, BaseException], None] | None = None,
                 latency_window: int = 200,
                 is_fatal: Callable[[BaseException], bool] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self._handler = handler
        self._on_reject = on_reject or (lambda item, reason, exc: None)
        self._is_fatal = is_fatal or (lambda exc: False)
        self._on_fatal = on_fatal or (lambda exc: None)
        self.fatal: BaseException | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._slot: tuple[Any, float] | None = None
        self._busy = False
        self._running = True
        self.counts = FrameCounts()
        self.latencies = deque(maxlen=latency_window)  # seconds, submit -> handler done
        self._thread = threading.Thread(target=self._run, name="kp_ros_worker", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> None:
        with self._lock:
            self.counts.received += 1
            if not self._running:
                self.counts.dropped += 1
                return
            if self._slot is not None:
                self.counts.dropped += 1
            self._slot = (item, time.monotonic())
            self._wake.notify()

    def reject(self, reason: str) -> None:
        """Count a frame refused on arrival (malformed): received and rejected, without
        touching the slot, so it never displaces the frame waiting there."""
        with self._lock:
            self.counts.received += 1
            self.counts.rejected += 1
            self.counts.reasons[reason_key(reason)] += 1

    @property
    def pending(self) -> int:
        with self._lock:
            return int(self._slot is not None) + int(self._busy)

    def snapshot(self) -> FrameCounts:
        with self._lock:
            c = self.counts
            return FrameCounts(c.received, c.processed, c.dropped, c.rejected, Counter(c.reasons))

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once nothing is waiting or in progress (for tests and bag replays)."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self.pending

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the frame in progress; a frame still waiting is counted as dropped."""
        with self._lock:
            self._running = False
            if self._slot is not None:
                self._slot = None
                self.counts.dropped += 1
            self._wake.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._running and self._slot is None:
                    self._wake.wait()
                if not self._running:
                    return
                (item, submitted), self._slot = self._slot, None
                self._busy = True
            outcome, reason, error = "processed", "", None
            try:
                self._handler(item)
            except FrameRejected as exc:
                outcome, reason, error = "rejected", str(exc), exc
            except Exception as exc:  # noqa: BLE001 - one bad frame must not kill the node
                outcome, reason, error = "rejected", f"{type(exc).__name__} during processing", exc
            fatal = outcome == "rejected" and not isinstance(error, FrameRejected) \
                and self._fatal(error)
            with self._lock:
                self._busy = False
                if fatal:
                    self.fatal, self._running = error, False
                    if self._slot is not None:  # never to be processed: counted as stop() does
                        self._slot = None
                        self.counts.dropped += 1
                if outcome == "processed":
                    self.counts.processed += 1
                    self.latencies.append(time.monotonic() - submitted)
                else:
                    self.counts.rejected += 1
                    self.counts.reasons[reason_key(reason)] += 1
            if error is not None:
                try:
                    self._on_reject(item, reason, error)
                except Exception:  # noqa: BLE001 - logging must not kill the worker either
                    pass
            if fatal:
                try:
                    self._on_fatal(error)
                except Exception:  # noqa: BLE001 - the worker ends here either way
                    pass
                return

    def _fatal(self, error: BaseException) -> bool:
        try:
            return bool(self._is_fatal(error))
        except Exception:  # noqa: BLE001 - a failing probe: keep the node running
            return False
