"""The worker's side of a shard lease: until when it may work on it, by its own clock.

The coordinator revokes a lease ``lease_timeout_s`` after it last *received* a renewal (the grant,
a heartbeat or a progress report of the holder). The worker cannot know when that was, but it
knows when it *sent* each renewal that then succeeded, which is earlier. So it stops pushing for
the lease at ``last successful send + lease_timeout_s - margin``: before the coordinator can hand
the shard to anyone else, whatever the network did in between. Only monotonic clocks are used,
and only their rates must agree (they need not be synchronised).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MARGIN_FRACTION = 0.2  # stop with a fifth of the lease still left on the coordinator's clock


class LeaseLost(Exception):
    """The shard in hand no longer belongs to this incarnation; drop it and ask for work."""


class LeaseClock:
    """Thread-safe: heartbeat and progress threads renew, the training loop asks."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._timeout_s = 0.0
        self._last_renewal_sent: float | None = None

    def now(self) -> float:
        return self._clock()

    def grant(self, sent_at: float, timeout_s: float) -> None:
        """A LeaseShard call sent at ``sent_at`` was granted a lease of ``timeout_s``."""
        with self._lock:
            self._timeout_s = timeout_s
            self._last_renewal_sent = sent_at

    def renewed(self, sent_at: float) -> None:
        """A heartbeat or progress report sent at ``sent_at`` succeeded."""
        with self._lock:
            if self._last_renewal_sent is not None:
                self._last_renewal_sent = max(self._last_renewal_sent, sent_at)

    def release(self) -> None:
        with self._lock:
            self._last_renewal_sent = None

    def remaining_s(self) -> float | None:
        """Seconds left to work on the lease (negative: overdue); None without a lease."""
        with self._lock:
            if self._last_renewal_sent is None:
                return None
            stop_at = self._last_renewal_sent + self._timeout_s * (1.0 - MARGIN_FRACTION)
        return stop_at - self._clock()

    def may_work(self) -> bool:
        remaining = self.remaining_s()
        return remaining is None or remaining > 0
