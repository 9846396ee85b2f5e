"""The consistency gate: when a pushed gradient is applied.

``async``: applied on arrival; staleness (version at apply minus base version) is recorded, and
the push's learning rate is scaled by the gate's ``lr_scaling`` policy (``ps_server/staleness.py``)
from its staleness and the number of workers pushing (members that pushed here and are still live).

``sync``: step ``v`` turns version ``v`` into ``v + 1`` with the sample-weighted mean of the
gradients computed from version ``v``. The step closes as soon as every participant has pushed.
Participants are the workers that pushed recently: a worker joins by pushing, leaves by
``leave`` (no shard to train) or by being declared dead (``retain_live``). A step also closes when
``step_timeout_s`` has passed since its first push, without the missing workers, who stop being
participants: nothing ever waits longer than the timeout for a slow, dead or idle worker.

``ssp`` (stale synchronous parallel, bound ``staleness`` = s): applied on arrival like async, and
each worker's clock is the number of its pushes this server applied. A push that takes its
worker's clock beyond min(clocks of the participants) + s is applied, but its caller waits until
the slowest catches up, so what it pulls next holds every participant's updates up to its own clock
minus s; with s = 0 workers move in lockstep. Participants join by pushing (at the clock of the
slowest, so a newcomer neither holds anybody back nor is held back), leave by ``leave`` or
``retain_live``, and a participant holding others back that has not pushed for ``step_timeout_s``
is dropped by ``tick``.

All decisions take ``now``; waiting for a step to close (sync) or for the slowest worker (ssp) are
the only blocking calls.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch

from lepton.errors import DeadlineExceeded, OptimizerFailed
from ps_server.staleness import LrScaling, StalenessAwareLr
from ps_server.store import ParameterStore


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
    ``clock`` is within the staleness bound of the slowest participant (``wait_for_clock``)."""

    member_id: str
    clock: int
    result: PushResult


STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)
MODES = ("async", "sync", "ssp")


@dataclass
class GateCounters:
    pushes_received: int = 0
    pushes_deduplicated: int = 0  # retries answered from memory, not applied again
    pushes_stale: int = 0
    updates_applied: int = 0
    pushes_lr_scaled: int = 0  # async: pushes applied with a reduced learning rate (too stale)
    steps_timed_out: int = 0  # sync steps closed, or ssp laggards dropped, by the timeout
    clock_gap_max: int = 0  # ssp: largest fastest-minus-slowest clock seen (staleness + 1 if callers wait)
    compute_gap_max: int = 0  # ssp: largest lead over the slowest a worker computed a gradient at (<= staleness)
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


def _mean_as(mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A step's sample-weighted mean in the tensor's dtype: integers (a buffer's change, such as
    BatchNorm's num_batches_tracked) rounded to the nearest, not truncated."""
    if dtype.is_floating_point or dtype.is_complex:
        return mean.to(dtype)
    return mean.round().to(dtype)


class ConsistencyGate:
    """Serialises access to a ParameterStore and applies the consistency mode. Thread-safe."""

    def __init__(
        self,
        store: ParameterStore,
        mode: str,
        step_timeout_s: float,
        after_apply: Callable[[ParameterStore], None] | None = None,
        staleness: int = 0,
        lr_scaling: LrScaling = StalenessAwareLr(),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        self.store = store
        self._after_apply = after_apply  # e.g. a periodic checkpoint; runs under the gate's lock
        self.mode = mode
        self.step_timeout_s = step_timeout_s
        self.counters = GateCounters()
        self._cond = threading.Condition()
        self._participants: set[str] = set()
        self._joins: dict[str, int] = {}  # sync: members taking part from that version on
        self._contributed: dict[str, int] = {}
        self._accum: dict[str, torch.Tensor] = {}
        self._accum_samples = 0
        self._step_opened_at: float | None = None
        self.staleness = staleness
        self._lr_scaling = lr_scaling
        self._pushers: set[str] = set()  # async: members that pushed and are not known to be dead
        self._clocks: dict[str, int] = {}  # ssp participants: pushes applied
        self._last_push_at: dict[str, float] = {}  # ssp participants: when they last pushed
        # Answers to recent pushes by (member, request id), oldest first: retries get them again.
        self._answered: OrderedDict[tuple[str, str], PushResult | ClockWait] = OrderedDict()
        self.dedup_window = 4096
        self._capture_at: int | None = None  # a checkpoint's target version, armed by capture()
        self._captured: tuple[int, dict] | None = None

    @property
    def version(self) -> int:
        with self._cond:
            return self.store.version

    @property
    def participants(self) -> set[str]:
        with self._cond:
            return set(self._clocks) if self.mode == "ssp" else set(self._participants)

    @property
    def clocks(self) -> dict[str, int]:
        """ssp: each participant's clock (pushes applied)."""
        with self._cond:
            return dict(self._clocks)

    def push(
        self,
        member_id: str,
        base_version: int,
        grads: Mapping[str, torch.Tensor],
        samples: int,
        now: float,
        request_id: str = "",
    ) -> PushResult | ClockWait | int:
        """Offers a checked gradient. Returns a PushResult when the outcome is known now (async,
        stale, or a retry of a push already answered), a ClockWait (ssp: applied; pass it to
        ``wait_for_clock``) or the version to wait for (sync: pass it to ``wait_for_version``). A
        push repeating an earlier ``request_id`` of the same member is applied at most once and
        gets the original answer."""
        with self._cond:
            key = (member_id, request_id)
            if request_id and key in self._answered:
                self.counters.pushes_deduplicated += 1
                return self._answered[key]
            self.counters.pushes_received += 1
            if self.store.failure:
                raise OptimizerFailed(self.store.failure)
            version = self.store.version
            if base_version > version or (self.mode == "sync" and base_version < version):
                self.counters.pushes_stale += 1
                return PushResult(PushOutcome.STALE, version)
            if self.mode == "ssp":
                return self._push_ssp(key, member_id, version - base_version, grads, now)
            if self.mode == "async":
                staleness = version - base_version
                self._pushers.add(member_id)
                lr_scale = self._lr_scaling.lr_scale(staleness, len(self._pushers))
                if lr_scale != 1.0:
                    self.counters.pushes_lr_scaled += 1
                self._apply(grads, lr_scale)
                self.counters.observe_staleness(staleness)
                self._cond.notify_all()
                return self._remember(key, PushResult(PushOutcome.APPLIED, self.store.version, staleness))
            if member_id not in self._contributed:  # a retried push of the same step adds nothing
                for name, g in grads.items():
                    weighted = g.to(torch.float64) * samples  # integer buffers' changes too
                    if name in self._accum:
                        self._accum[name] += weighted
                    else:
                        self._accum[name] = weighted.clone()
                self._accum_samples += samples
                self._contributed[member_id] = samples
                if self._step_opened_at is None:
                    self._step_opened_at = now
            self._participants.add(member_id)
            self._maybe_close()
            return version + 1

    def _push_ssp(
        self,
        key: tuple[str, str],
        member_id: str,
        staleness: int,
        grads: Mapping[str, torch.Tensor],
        now: float,
    ) -> ClockWait:
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

    def may_proceed(self, wait: ClockWait) -> bool:
        """ssp: whether the caller of this push is within the bound (or no longer a participant,
        so nobody's clock binds it)."""
        with self._cond:
            if wait.member_id not in self._clocks:
                return True
            return wait.clock <= min(self._clocks.values()) + self.staleness

    def wait_for_clock(self, wait: ClockWait, timeout_s: float) -> PushResult:
        """Blocks until ``may_proceed(wait)``; raises DeadlineExceeded after timeout_s (the push
        stays applied: retry it with the same request id to wait again)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.store.failure or self.may_proceed(wait), timeout=timeout_s):
                raise DeadlineExceeded(
                    f"{wait.member_id} at clock {wait.clock} is more than {self.staleness} ahead of the "
                    f"slowest worker after {timeout_s:.1f}s; retry the push with the same request id"
                )
            if self.store.failure:
                raise OptimizerFailed(self.store.failure)
            return wait.result

    def wait_for_version(
        self, version: int, timeout_s: float, member_id: str = "", request_id: str = ""
    ) -> PushResult:
        """Blocks until the store reaches ``version``; raises DeadlineExceeded after timeout_s."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.store.failure or self.store.version >= version, timeout=timeout_s):
                raise DeadlineExceeded(
                    f"sync step {version - 1} did not close within {timeout_s:.1f}s; retry the push"
                )
            if self.store.failure:
                raise OptimizerFailed(self.store.failure)
            result = PushResult(PushOutcome.APPLIED, version)
            self._remember((member_id, request_id), result)
            return result

    def _remember(self, key: tuple[str, str], result: PushResult | ClockWait) -> PushResult | ClockWait:
        if key[1]:
            self._answered[key] = result
            while len(self._answered) > self.dedup_window:
                self._answered.popitem(last=False)
        return result

    def join(self, member_id: str, from_version: int, timeout_s: float) -> tuple[bool, int]:
        """Sync: ``member_id`` takes part from step ``from_version`` on, if this server has not
        passed it; returns (joined, version) once the version reaches ``from_version`` (refused:
        at once, nothing changed). Raises DeadlineExceeded after ``timeout_s`` (the join stands
        until ``leave``). Other modes: (True, version) at once.

        A server with no participant (every worker left, was dropped or is joining, as after
        this server restarted) has no step in flight, so nothing would move its version: it takes
        every waiting joiner into its open step at once (see ``_admit_idle``)."""
        with self._cond:
            version = self.store.version
            if self.mode != "sync" or member_id in self._participants:
                return True, version
            if version > from_version:
                return False, version
            if version == from_version:
                self._participants.add(member_id)  # the open step cannot close without it now
                return True, version
            self._joins[member_id] = from_version
            if self._admit_idle():
                return True, version
            if not self._cond.wait_for(
                lambda: self.store.version >= from_version or member_id not in self._joins, timeout=timeout_s
            ):
                raise DeadlineExceeded(
                    f"version {self.store.version} did not reach {from_version} within {timeout_s:.1f}s; "
                    "the join stands until LeaveSteps"
                )
            return member_id in self._participants, self.store.version

    def _admit_idle(self) -> bool:
        """Sync, under the lock: with no participant left, takes every pending joiner into the
        open step (all of them at once, so they take part in the same steps here) and wakes them.
        Returns whether it did."""
        if self._participants or not self._joins:
            return False
        self._participants.update(self._joins)
        self._joins.clear()
        self._cond.notify_all()
        return True

    def leave(self, member_id: str) -> None:
        """The worker has no shard: steps stop waiting for it until it pushes again."""
        with self._cond:
            self._participants.discard(member_id)
            self._joins.pop(member_id, None)
            self._cond.notify_all()  # a join waiting for its step gives up
            self._drop_clocks({member_id})
            self._maybe_close()
            self._admit_idle()

    def retain_live(self, live: set[str]) -> None:
        """Drops participants the coordinator no longer lists as alive."""
        with self._cond:
            self._participants &= live
            self._pushers &= live
            self._joins = {m: v for m, v in self._joins.items() if m in live}
            self._cond.notify_all()
            self._drop_clocks(set(self._clocks) - live)
            self._maybe_close()
            self._admit_idle()

    def tick(self, now: float) -> bool:
        """Closes a step that has waited ``step_timeout_s`` for missing workers; returns whether it
        did. The missing workers stop being participants (they rejoin by pushing).

        ssp: drops the participants that hold another more than ``staleness`` behind and have not
        pushed for ``step_timeout_s``; returns whether it dropped any."""
        with self._cond:
            if self.mode == "ssp":
                return self._tick_ssp(now)
            opened = self._step_opened_at
            if opened is None or now - opened < self.step_timeout_s:
                return False
            self._participants = set(self._contributed)
            self.counters.steps_timed_out += 1
            self._close()
            return True

    def _tick_ssp(self, now: float) -> bool:
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

    def _maybe_close(self) -> None:
        if self._contributed and self._participants <= set(self._contributed):
            self._close()

    def _close(self) -> None:
        total = self._accum_samples
        grads = {name: _mean_as(acc / total, self.store.specs[name].dtype) for name, acc in self._accum.items()}
        self._apply(grads)
        self._accum = {}
        self._accum_samples = 0
        self._contributed = {}
        self._step_opened_at = None
        for member, from_version in list(self._joins.items()):  # joiners whose step has come
            if from_version <= self.store.version:
                self._participants.add(member)
                del self._joins[member]
        self._cond.notify_all()

    def snapshot(
        self, names: list[str] | None = None, rows: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """(version, copies of the tensors or of their selected rows) taken atomically."""
        with self._cond:
            return self.store.version, self.store.snapshot(names, rows)
