"""The consistency gate: when a pushed gradient is applied.

``ConsistencyGate`` serialises access to a ParameterStore and holds what every consistency mode
shares: answers to retried pushes, counters, checkpoint captures and snapshots. Each mode is one
subclass that decides what a push does and what its caller waits for: ``AsyncGate``
(ps_server/gate_async.py), ``SyncGate`` (gate_sync.py) and ``SspGate`` (gate_ssp.py);
``ps_server.consistency.consistency_gate`` builds the one a mode names.

A push returns a PushResult when its outcome is known at once (applied on arrival, stale, or a
retry answered from memory), else what its caller waits for; ``settle`` turns either into the
PushResult. All decisions take ``now``; waiting (``settle``, ``join``) is the only blocking.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

import torch

from lepton.errors import DeadlineExceeded, OptimizerFailed
from ps_server.store import ParameterStore

T = TypeVar("T")


class PushOutcome(Enum):
    APPLIED = 1
    STALE = 2


@dataclass(frozen=True)
class PushResult:
    outcome: PushOutcome
    version: int
    staleness: int = 0


@dataclass(frozen=True)
class Capture:
    """The outcome of ``ConsistencyGate.capture``: the store's full state at the target version
    (``state``), or that the target is still ahead (armed; ask again) or already passed
    (``missed``). ``version`` is the version the state holds, or the current one."""

    version: int
    state: dict | None = None
    missed: bool = False


@dataclass(frozen=True)
class ClockWait:
    """An ssp push that was applied: its caller may return ``result`` once ``member_id``'s clock
    ``clock`` is within the staleness bound of the slowest participant (``SspGate.wait_for_clock``)."""

    member_id: str
    clock: int
    result: PushResult


# What a push returns: its result, or what its caller waits for before it (ssp: a clock; sync:
# the version that closes its step).
PushAnswer = PushResult | ClockWait | int

STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)


@dataclass
class GateCounters:
    pushes_received: int = 0
    pushes_deduplicated: int = 0  # retries answered from memory, not applied again
    pushes_stale: int = 0
    updates_applied: int = 0
    pushes_lr_scaled: int = 0  # async: pushes applied with a reduced learning rate (too stale)
    steps_timed_out: int = 0  # sync steps closed, or ssp laggards dropped, by the timeout
    clock_gap_max: int = 0  # ssp: largest fastest-minus-slowest clock seen (staleness + 1 if callers wait)
    # ssp: largest lead over the slowest a worker computed a gradient at (<= staleness)
    compute_gap_max: int = 0
    staleness_max: int = 0
    staleness_sum: int = 0
    staleness_count: int = 0
    # staleness_le[i] counts applied pushes with staleness <= STALENESS_BUCKETS[i] (cumulative)
    staleness_le: list = field(default_factory=lambda: [0] * len(STALENESS_BUCKETS))

    def observe_staleness(self, staleness: int) -> None:
        self.staleness_max = max(self.staleness_max, staleness)
        self.staleness_sum += staleness
        self.staleness_count += 1
        for i, bound in enumerate(STALENESS_BUCKETS):
            if staleness <= bound:
                self.staleness_le[i] += 1

    @property
    def staleness_mean(self) -> float:
        return self.staleness_sum / self.staleness_count if self.staleness_count else 0.0


Key = tuple[str, str]  # (member id, request id) of a push
Grads = Mapping[str, torch.Tensor]


class ConsistencyGate:
    """The interface of the three modes, and what they share. Thread-safe.

    Subclasses implement ``_offer`` (a checked, non-stale push, under the lock) and may override
    ``_prepare`` (what a push's gradients become before the lock is taken: work that needs no
    state stays out of the lock), ``_is_stale``, ``_await``, ``join``, ``_leave``, ``_retain_live``, ``_tick`` and
    ``_participants_now``; every ``_``-hook runs under the gate's lock.
    """

    mode = ""

    def __init__(
        self,
        store: ParameterStore,
        step_timeout_s: float,
        after_apply: Callable[[ParameterStore], None] | None = None,
    ) -> None:
        self.store = store
        self._after_apply = after_apply  # e.g. a periodic checkpoint; runs under the gate's lock
        self.step_timeout_s = step_timeout_s
        self.counters = GateCounters()
        self._cond = threading.Condition()
        # Answers to recent pushes by (member, request id), oldest first: retries get them again.
        self._answered: OrderedDict[Key, PushResult | ClockWait] = OrderedDict()
        self.dedup_window = 4096
        self._capture_at: int | None = None  # a checkpoint's target version, armed by capture()
        self._captured: tuple[int, dict] | None = None

    @property
    def version(self) -> int:
        with self._cond:
            return self.store.version

    @property
    def participants(self) -> set[str]:
        """The workers the mode waits for (sync: to close a step; ssp: to catch up)."""
        with self._cond:
            return self._participants_now()

    @property
    def clocks(self) -> dict[str, int]:
        """ssp: each participant's clock (pushes applied); empty in the other modes."""
        return {}

    # --- pushes --------------------------------------------------------------------------------

    def push(
        self,
        member_id: str,
        base_version: int,
        grads: Mapping[str, torch.Tensor],
        samples: int,
        now: float,
        request_id: str = "",
    ) -> PushAnswer:
        """Offers a checked gradient. Returns a PushResult when the outcome is known now, else what
        to wait for (pass it to ``settle``). A push repeating an earlier ``request_id`` of the same
        member is applied at most once and gets the original answer."""
        prepared = self._prepare(grads, samples)
        with self._cond:
            key = (member_id, request_id)
            if request_id and key in self._answered:
                self.counters.pushes_deduplicated += 1
                return self._answered[key]
            self.counters.pushes_received += 1
            if self.store.failure:
                raise OptimizerFailed(self.store.failure)
            version = self.store.version
            if self._is_stale(base_version, version):
                self.counters.pushes_stale += 1
                return PushResult(PushOutcome.STALE, version)
            return self._offer(key, member_id, base_version, prepared, samples, now)

    def settle(
        self, outcome: PushAnswer, timeout_s: float, member_id: str = "", request_id: str = ""
    ) -> PushResult:
        """The PushResult of what ``push`` returned, waiting up to ``timeout_s`` for it when the
        mode makes the caller wait; raises DeadlineExceeded after that."""
        if isinstance(outcome, PushResult):
            return outcome
        return self._await(outcome, timeout_s, (member_id, request_id))

    def wait_for_version(
        self, version: int, timeout_s: float, member_id: str = "", request_id: str = ""
    ) -> PushResult:
        """Blocks until the store reaches ``version``; raises DeadlineExceeded after timeout_s."""
        with self._cond:
            reached = self._cond.wait_for(
                lambda: self.store.failure or self.store.version >= version, timeout=timeout_s
            )
            if not reached:
                raise DeadlineExceeded(
                    f"sync step {version - 1} did not close within {timeout_s:.1f}s; retry the push"
                )
            if self.store.failure:
                raise OptimizerFailed(self.store.failure)
            result = PushResult(PushOutcome.APPLIED, version)
            self._remember((member_id, request_id), result)
            return result

    def _prepare(self, grads: Grads, samples: int) -> Grads:
        return grads

    def _is_stale(self, base_version: int, version: int) -> bool:
        return base_version > version

    def _offer(
        self, key: Key, member_id: str, base_version: int, grads: Grads, samples: int, now: float
    ) -> PushAnswer:
        raise NotImplementedError

    def _await(self, pending: ClockWait | int, timeout_s: float, key: Key) -> PushResult:
        raise TypeError(f"a {self.mode} gate has no pending push {pending!r}")

    def _remember(self, key: Key, result: PushResult | ClockWait) -> PushResult | ClockWait:
        if key[1]:
            self._answered[key] = result
            while len(self._answered) > self.dedup_window:
                self._answered.popitem(last=False)
        return result

    def _apply(self, grads: Mapping[str, torch.Tensor], lr_scale: float = 1.0) -> None:
        try:
            self.store.apply(grads, lr_scale)
        except OptimizerFailed:
            self._cond.notify_all()  # pushes waiting for a step or a clock fail now, not at their timeout
            raise
        self.counters.updates_applied += 1
        if self._capture_at == self.store.version:
            self._captured = (self.store.version, self.store.state_dict())
            self._capture_at = None
        if self._after_apply is not None:
            self._after_apply(self.store)

    # --- membership ----------------------------------------------------------------------------

    def join(self, member_id: str, from_version: int, timeout_s: float) -> tuple[bool, int]:
        """Sync: ``member_id`` takes part from step ``from_version`` on (see SyncGate.join). Other
        modes: (True, version) at once."""
        with self._cond:
            return True, self.store.version

    def leave(self, member_id: str) -> None:
        """The worker has no shard: the mode stops waiting for it until it pushes again."""
        with self._cond:
            self._cond.notify_all()  # a join waiting for its step gives up
            self._leave(member_id)

    def retain_live(self, live: set[str]) -> None:
        """Drops participants the coordinator no longer lists as alive."""
        with self._cond:
            self._cond.notify_all()
            self._retain_live(live)

    def tick(self, now: float) -> bool:
        """Applies the mode's timeout (see the subclass); returns whether it changed anything."""
        with self._cond:
            return self._tick(now)

    def _participants_now(self) -> set[str]:
        return set()

    def _leave(self, member_id: str) -> None:
        pass

    def _retain_live(self, live: set[str]) -> None:
        pass

    def _tick(self, now: float) -> bool:
        return False

    # --- reading the store ---------------------------------------------------------------------

    def capture(self, target_version: int) -> Capture:
        """The store's full state (parameters, optimizer, schedule, version) when its version is
        exactly ``target_version`` (0: now), taken under the lock so it holds whole updates (a sync
        step entirely or not at all). A target still ahead is armed: the state is copied the
        moment an update reaches it, and a later call returns it."""
        with self._cond:
            version = self.store.version
            if self._captured is not None and self._captured[0] == target_version:
                return Capture(target_version, self._captured[1])
            if target_version <= 0 or version == target_version:
                return Capture(version, self.store.state_dict())
            if version > target_version:
                return Capture(version, missed=True)
            self._capture_at = target_version
            return Capture(version)

    def under_lock(self, fn: Callable[[ParameterStore], T]) -> T:
        """``fn(store)`` under the gate's lock: it sees whole updates (a periodic checkpoint's copy)."""
        with self._cond:
            return fn(self.store)

    def snapshot(
        self, names: list[str] | None = None, rows: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """(version, copies of the tensors or of their selected rows) taken atomically."""
        with self._cond:
            return self.store.version, self.store.snapshot(names, rows)

    def read(
        self,
        names: list[str] | None,
        rows: Mapping[str, torch.Tensor] | None,
        reader: Callable[[int, list[tuple[str, torch.Tensor]]], T],
    ) -> tuple[int, T]:
        """(version, ``reader(version, tensors)``) with ``reader`` called under the lock on the
        live tensors (whole ones not copied; selected rows are): it must copy what it keeps."""
        with self._cond:
            version = self.store.version
            return version, reader(version, self.store.snapshot(names, rows, copy=False))
