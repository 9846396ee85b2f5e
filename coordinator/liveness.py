"""The heartbeat interval the coordinator directs its workers to use, and the timeout that goes with
it.

A coordinator can answer only so many heartbeats a second. With few workers they beat at the job's
``heartbeat_interval_s``; with more than ``beats_per_s`` times that interval's worth, each is told
(in every heartbeat reply) to beat ``scale`` times less often, so that all of them together send
about ``beats_per_s`` beats a second, and the heartbeat timeout grows by the same ``scale``.
The scale never exceeds ``max_scale`` (the job's: at most 10, and the interval at most a quarter
of the lease timeout, as heartbeats renew leases).

The timeout may shrink only once no worker can still be beating at a longer interval it was told
earlier: a scale announced is honoured for one (scaled) timeout after the last time it was
announced. Parameter servers are few and carry the roster and checkpoints: they always beat at
the job's interval, and their timeout is the job's. Pure: every decision takes ``now``.
"""

from __future__ import annotations

import math

from lepton.errors import InvalidArgument

BEATS_PER_S = 400.0  # what the coordinator aims to receive from all workers together
MAX_SCALE = 10.0


class LivenessScale:
    def __init__(
        self, interval_s: float, timeout_s: float, beats_per_s: float = BEATS_PER_S, max_scale: float = MAX_SCALE
    ) -> None:
        if not (interval_s > 0 and timeout_s > 0 and beats_per_s > 0 and max_scale >= 1):
            raise InvalidArgument(
                "need interval_s > 0, timeout_s > 0, beats_per_s > 0 and max_scale >= 1, got "
                f"{interval_s}, {timeout_s}, {beats_per_s}, {max_scale}"
            )
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.beats_per_s = beats_per_s
        self.max_scale = max_scale
        self.scale = 1.0  # what replies announce now
        self._held = 1.0  # the largest scale announced within its own timeout
        self._held_until = -math.inf

    def update(self, workers: int, now: float) -> None:
        """Sets the scale for ``workers`` live workers (at each expiry tick): replies announced the
        current one until ``now``, and announce the new one from now on."""
        self._hold(now)
        wanted = workers / (self.interval_s * self.beats_per_s)  # beats a second asked of them, over the aim
        self.scale = min(self.max_scale, max(1.0, wanted))
        self._hold(now)

    def announced(self) -> float:
        """The interval a worker's heartbeat reply directs (seconds)."""
        return self.interval_s * self.scale

    def worker_timeout_s(self, now: float) -> float:
        """How long a worker may stay silent at ``now`` before it is declared dead."""
        held = self._held if now <= self._held_until else 1.0
        return self.timeout_s * max(self.scale, held)

    def _hold(self, now: float) -> None:
        if self.scale >= self._held or now > self._held_until:
            self._held = self.scale
            self._held_until = now + self.timeout_s * self.scale
