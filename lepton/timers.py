"""One thread that runs callbacks when they fall due: the timer heap under the server's call
watchdog (``lepton.limits.Watchdog``) and the client's deadline guard (``lepton.deadline_guard``)."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("lepton.timers")

# [due, sequence, callback or None once cancelled or run]; the sequence keeps equal dues in order
# and spares the heap from comparing callbacks.
Timer = list


class TimerHeap:
    """Calls each scheduled callback once, on one daemon thread started by the first ``schedule``,
    at ``clock() + delay_s`` or soon after, unless it was cancelled first. Callbacks run outside the
    heap's lock, one at a time; one that raises is logged and the others still run. Thread-safe."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._name = name
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[Timer] = []
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, delay_s: float, callback: Callable[[], object]) -> Timer:
        """Runs ``callback`` in ``delay_s`` seconds; returns the timer (for ``cancel``)."""
        timer = [self._clock() + delay_s, next(self._sequence), callback]
        with self._cond:
            heapq.heappush(self._heap, timer)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            if self._heap[0] is timer:
                self._cond.notify()  # due before whatever the thread waits for
        return timer

    @staticmethod
    def cancel(timer: Timer) -> None:
        """The callback will not run (if it has not yet); the entry leaves the heap lazily."""
        timer[2] = None

    def pending(self) -> int:
        """Timers neither run nor cancelled."""
        with self._cond:
            return sum(1 for t in self._heap if t[2] is not None)

    def _next_due(self) -> Callable[[], object]:
        """Waits for the earliest timer to fall due and takes its callback off the heap."""
        with self._cond:
            while True:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - self._clock()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                timer = heapq.heappop(self._heap)
                callback, timer[2] = timer[2], None
                return callback

    def _run(self) -> None:
        while True:
            callback = self._next_due()
            try:
                callback()
            except Exception:  # noqa: BLE001 - one failing callback must not stop the others
                try:
                    log.exception("timer_callback_failed", timers=self._name)
                except Exception:  # noqa: BLE001 - nor a log that cannot be written
                    pass
