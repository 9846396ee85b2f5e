"""``ssp`` (stale synchronous parallel, bound ``staleness`` = s): a pushed gradient is applied on
arrival like async, and each worker's clock is the number of its pushes this server applied.

A push that takes its worker's clock beyond min(clocks of the participants) + s is applied, but
its caller waits until the slowest catches up, so what it pulls next holds every participant's
updates up to its own clock minus s; with s = 0 workers move in lockstep. Participants join by
pushing (at the clock of the slowest, so a newcomer neither holds anybody back nor is held back),
leave by ``leave`` or ``retain_live``, and a participant holding others back that has not pushed
for ``step_timeout_s`` is dropped by ``tick``.
"""

from __future__ import annotations

from collections.abc import Callable

from lepton.errors import DeadlineExceeded, OptimizerFailed
from ps_server.gate import ClockWait, ConsistencyGate, Grads, Key, PushOutcome, PushResult
from ps_server.store import ParameterStore


class SspGate(ConsistencyGate):
    mode = "ssp"

    def __init__(
        self,
        store: ParameterStore,
        step_timeout_s: float,
        after_apply: Callable[[ParameterStore], None] | None = None,
        staleness: int = 0,
    ) -> None:
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        super().__init__(store, step_timeout_s, after_apply)
        self.staleness = staleness
        self._clocks: dict[str, int] = {}  # participants: pushes applied
        self._last_push_at: dict[str, float] = {}  # participants: when they last pushed

    @property
    def clocks(self) -> dict[str, int]:
        with self._cond:
            return dict(self._clocks)

    def _participants_now(self) -> set[str]:
        return set(self._clocks)

    def _offer(
        self, key: Key, member_id: str, base_version: int, grads: Grads, samples: int, now: float
    ) -> ClockWait:
        staleness = self.store.version - base_version
        if member_id not in self._clocks:
            self._clocks[member_id] = min(self._clocks.values(), default=0)
        self._apply(grads)
        self.counters.observe_staleness(staleness)
        # The worker computed this gradient at its clock before the push, after its previous wait.
        lead = self._clocks[member_id] - min(self._clocks.values())
        self.counters.compute_gap_max = max(self.counters.compute_gap_max, lead)
        self._clocks[member_id] += 1
        self._last_push_at[member_id] = now
        gap = max(self._clocks.values()) - min(self._clocks.values())
        self.counters.clock_gap_max = max(self.counters.clock_gap_max, gap)
        self._cond.notify_all()
        result = PushResult(PushOutcome.APPLIED, self.store.version, staleness)
        wait = ClockWait(member_id, self._clocks[member_id], result)
        self._remember(key, wait)
        return wait

    def _await(self, pending: ClockWait | int, timeout_s: float, key: Key) -> PushResult:
        if not isinstance(pending, ClockWait):
            return super()._await(pending, timeout_s, key)
        return self.wait_for_clock(pending, timeout_s)

    def may_proceed(self, wait: ClockWait) -> bool:
        """Whether the caller of this push is within the bound (or no longer a participant, so
        nobody's clock binds it)."""
        with self._cond:
            if wait.member_id not in self._clocks:
                return True
            return wait.clock <= min(self._clocks.values()) + self.staleness

    def wait_for_clock(self, wait: ClockWait, timeout_s: float) -> PushResult:
        """Blocks until ``may_proceed(wait)``; raises DeadlineExceeded after timeout_s (the push
        stays applied: retry it with the same request id to wait again)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.store.failure or self.may_proceed(wait), timeout_s):
                raise DeadlineExceeded(
                    f"{wait.member_id} at clock {wait.clock} is more than {self.staleness} ahead of the "
                    f"slowest worker after {timeout_s:.1f}s; retry the push with the same request id"
                )
            if self.store.failure:
                raise OptimizerFailed(self.store.failure)
            return wait.result

    def _leave(self, member_id: str) -> None:
        self._drop_clocks({member_id})

    def _retain_live(self, live: set[str]) -> None:
        self._drop_clocks(set(self._clocks) - live)

    def _tick(self, now: float) -> bool:
        """Drops the participants that hold another more than ``staleness`` behind and have not
        pushed for ``step_timeout_s``; returns whether it dropped any."""
        if not self._clocks:
            return False
        fastest = max(self._clocks.values())
        laggards = {
            member
            for member, clock in self._clocks.items()
            if clock + self.staleness < fastest and now - self._last_push_at[member] >= self.step_timeout_s
        }
        if not laggards:
            return False
        self.counters.steps_timed_out += 1
        self._drop_clocks(laggards)
        return True

    def _drop_clocks(self, members: set[str]) -> None:
        for member in members & set(self._clocks):
            del self._clocks[member]
            del self._last_push_at[member]
        if members:
            self._cond.notify_all()
