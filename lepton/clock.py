"""Time sources. Domain objects take ``now`` (monotonic seconds) as a parameter; only composition
roots read a real clock."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...


class MonotonicClock:
    """The real monotonic clock."""

    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock tests advance by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        self._now += seconds
        return self._now
