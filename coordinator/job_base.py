"""The core of a coordinator job: its parts, and how each change is saved.

``JobCore`` owns the state every operation shares (members, ledger, layout, parameter servers,
checkpoints, events) and the one lock that guards it; its lifecycle is in
coordinator/job_lifecycle.py, the operations in coordinator/job_membership.py, job_evaluation.py
and job.py. Nothing here knows about gRPC.

How changes are saved (group commit): an operation changes memory under the lock and records the
change (``_persist``: a counter, the members and shards it touched are marked dirty). An operation
whose answer must be durable (``_changing``) then leaves the lock and waits for a commit that
covers its change: the first such waiter takes the commit lock, collects every change made so far
under the job lock (the job document and only the dirty member and shard rows, the new
completions and events), and commits them with the job lock released; waiters queued behind it
usually find their change committed by then. A refused commit (StateNotSaved) rolls memory back to
what the store holds and fails every waiter whose change it carried or that came after it.
Progress reports do not wait; the expiry tick (or the next waiter) commits them.

Heartbeats read what they answer from ``view``, replaced only after a commit (or at once without
a store): nobody learns of a state that a crash or a refused commit could take back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from coordinator.checkpoints import JobCheckpoints
from coordinator.events import EventKind, EventLog
from coordinator.fleet import ServerFleet
from coordinator.job_types import EvaluationResult, JobState, Progress, WorkerView
from coordinator.layout import Layout
from coordinator.ledger import Completion, ShardLedger
from coordinator.liveness import MAX_SCALE, LivenessScale
from coordinator.membership import MembershipTable, Role
from coordinator.state_codec import (
    MEMBER_ROWS,
    SHARD_ROWS,
    JobRecord,
    StateRecord,
    decode,
    encode,
    saved_completion,
)
from coordinator.statedb import JobStore, SavedCompletion, SavedJob
from coordinator.validation import ValidationRecord
from lepton.config import JobSpec
from lepton.errors import ConfigError, InvalidArgument, StateNotSaved
from lepton.optimizers import Granularity, granularity
from lepton.tensors import TensorKind, TensorSpec


@dataclass(frozen=True)
class JobView:
    """What heartbeats answer from, as of the newest commit."""

    state: JobState
    layout_version: int
    fence_version: int
    workers: tuple[WorkerView, ...] = ()  # the roster parameter servers apply


@dataclass
class _Batch:
    through: int  # changes up to this count are in it
    documents: dict[str, dict]
    rows: dict[str, dict]
    completions: list[SavedCompletion]
    events: list[dict]
    last_event: int
    view: JobView
    now: float = 0.0


class JobCore:
    """One job's shared control-plane state. Not used alone: Job adds the operations."""

    def __init__(
        self,
        spec: JobSpec,
        num_train_samples: int,
        initial_parameters: Mapping[str, torch.Tensor],
        events: EventLog | None = None,
        store: JobStore | None = None,
        now: float = 0.0,
        max_shard_attempts: int = 3,
        wall_clock: Callable[[], float] = time.time,
        sparse: Collection[str] = (),
        kinds: Mapping[str, TensorKind] | None = None,
        tied: Mapping[str, str] | None = None,
        stall_threshold_s: float | None = None,
    ) -> None:
        self.spec = spec
        self._tied = dict(tied or {})  # state_dict name -> the carried name of the same tensor
        self.events = events or EventLog(staged=True)
        self._lock = threading.RLock()
        self._commit_lock = threading.Lock()  # held by the waiter that commits (never under _lock)
        self._changes = 0  # changes recorded by _persist
        self._settled = 0  # changes whose commit succeeded or failed
        self._failed: deque[tuple[int, int, str]] = deque(maxlen=256)  # change ranges a refused commit dropped
        self._unsaved_completions: list[Completion] = []
        self._last_now = now
        self._job_changed = threading.Condition(self._lock)  # LeaseShard long polls wait on it
        self._lease_waiters = 0
        self._members = MembershipTable(spec.heartbeat_timeout_s)
        # A directed interval stays within a quarter of the lease timeout: heartbeats renew leases.
        self._liveness = LivenessScale(
            spec.heartbeat_interval_s, spec.heartbeat_timeout_s,
            max_scale=max(1.0, min(MAX_SCALE, spec.lease_timeout_s / 4 / spec.heartbeat_interval_s)),
        )
        self._ledger = ShardLedger(
            num_train_samples, spec.shards_per_epoch, spec.epochs, max_attempts=max_shard_attempts,
            lease_timeout_s=spec.lease_timeout_s,
        )
        self._initial = {k: v.detach().clone() for k, v in initial_parameters.items()}
        self._specs = [
            TensorSpec(
                k, v.dtype, tuple(v.shape), sparse=k in sparse, kind=(kinds or {}).get(k, TensorKind.PARAMETER)
            )
            for k, v in self._initial.items()
        ]
        self._layout: Layout | None = None
        # Optimizers that read a whole tensor per update (Adafactor, Muon) get whole tensors.
        self._whole_tensors = granularity(spec.optimizer) is Granularity.TENSOR
        self._state = JobState.WAITING_FOR_SERVERS
        self._failure = ""
        self._dead_count = 0
        self._progress = Progress()
        self._train_started: float | None = None
        self._train_ended: float | None = None
        self._evaluator: tuple[str, int] | None = None
        # Incarnations that declined the evaluation: never offered it again (not saved: after a
        # coordinator restart one may be offered it again and decline again).
        self._declined: set[tuple[str, int]] = set()
        self._evaluation: EvaluationResult | None = None
        self._validation: list[ValidationRecord] = []  # validations during training, oldest first
        self._validation_due: int | None = None  # the ended epoch whose validation is pending
        self._stopped_early = ""  # why training ended before its last epoch
        self._wall_clock = wall_clock
        self._last_epoch_announced = -1
        self.leases_granted = 0
        self.leases_expired = 0
        self.saves_failed = 0  # changes the store could not commit (rolled back, callers told to retry)
        self.saves_failing_since: float | None = None  # when the current run of refused commits began
        self._fleet = ServerFleet(recovery_timeout_s=max(30.0, 10 * spec.heartbeat_timeout_s))
        # The expiry loop's period. A gap between ticks longer than stall_threshold_s means the
        # coordinator itself stalled (SIGSTOP, a starved CPU, a long GC) and may have left every
        # member's heartbeat unheard: it forgives everyone the time it was away before judging.
        # None (unit tests that jump a fake clock between sparse ticks): no stalls.
        self.tick_interval_s = min(spec.heartbeat_interval_s / 2, 0.25)
        if stall_threshold_s is not None and stall_threshold_s <= self.tick_interval_s:
            raise InvalidArgument(
                f"stall_threshold_s must exceed the tick interval {self.tick_interval_s:g}s, "
                f"got {stall_threshold_s}"
            )
        self.stall_threshold_s = stall_threshold_s
        self.stalls_detected = 0
        self._last_tick: float | None = None
        self._store = store
        self._checkpoints = JobCheckpoints(spec, self.events, wall_clock, store, self._specs, self._tied)
        self.restored = False
        self.view = JobView(self._state, 0, 0)
        saved = store.load() if store is not None else None
        if saved is not None:
            self._restore(saved, now)
        else:
            self._persist(now)
            self._await(self._changes)

    @property
    def heartbeats_missed(self) -> int:
        return self._members.heartbeats_missed

    @heartbeats_missed.setter
    def heartbeats_missed(self, value: int) -> None:
        self._members.heartbeats_missed = value


    # --- durability ----------------------------------------------------------------------------

    def _persist(self, now: float, completion: Completion | None = None) -> None:
        """Records a change (under the lock). Without a store it takes effect at once; with one,
        ``_changing`` callers wait for its commit and everything else is committed with them or
        by the next ``flush``."""
        self._changes += 1
        self._last_now = max(self._last_now, now)
        if completion is not None:
            self._unsaved_completions.append(completion)
        self._wake_lease_waiters()
        if self._store is None:
            self.view = self._make_view()
            self._members.dirty.clear()
            self._ledger.dirty.clear()
            self._settled = self._changes
            self.events.publish()

    def _wake_lease_waiters(self) -> None:
        """Wakes LeaseShard long polls when their answer may have changed (under the lock)."""
        if self._lease_waiters and (
            self._state is not JobState.TRAINING
            or (self._ledger.pending and not self._fleet.lost_at and not self._fleet.revoking)
        ):
            self._job_changed.notify_all()

    def _make_view(self) -> JobView:
        workers = self.view.workers
        if self._members.dirty or not workers:
            workers = tuple(
                WorkerView(m.member_id, m.incarnation, m.alive) for m in self._members.members(Role.WORKER)
            )
        return JobView(self._state, self.layout_version, self._fleet.fence_version, workers)

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Runs an operation under the lock; if it changed anything, waits (lock released) until
        that change is committed. Raises StateNotSaved if the commit was refused."""
        with self._lock:
            before = self._changes
            yield
            ticket = self._changes if self._changes != before else 0
        if ticket:
            self._await(ticket)

    def flush(self) -> None:
        """Commits the changes nobody waited for (progress). Raises StateNotSaved if refused."""
        with self._lock:
            ticket = self._changes if self._settled < self._changes else 0
        if ticket:
            self._await(ticket)

    def _await(self, ticket: int) -> None:
        if self._store is None:
            return
        with self._commit_lock:
            if self._settled < ticket:
                self._commit()
        for first, last, why in self._failed:
            if first <= ticket <= last:
                raise StateNotSaved(why)

    def _collect(self) -> _Batch:
        """Everything changed since the last commit (under the lock)."""
        now = self._last_now
        documents = encode(self._record(now), self._members.fenced_rejections, self._ledger.counters())
        rows: dict[str, dict] = {
            MEMBER_ROWS: {m: self._members.row(m) for m in self._members.dirty},
            SHARD_ROWS: {str(i): self._ledger.shard_row(i) for i in self._ledger.dirty},
        }
        events = self.events.staged()
        batch = _Batch(
            self._changes, documents, rows, [saved_completion(c) for c in self._unsaved_completions],
            [e.to_dict() for e in events], events[-1].sequence if events else 0, self._make_view(), now,
        )
        self._members.dirty.clear()
        self._ledger.dirty.clear()
        self._unsaved_completions.clear()
        return batch

    def _commit(self) -> None:
        """Commits every change recorded so far (the caller holds the commit lock, not _lock)."""
        assert self._store is not None
        with self._lock:
            if self._settled >= self._changes:
                return
            batch = self._collect()
        try:
            self._store.save(batch.documents, batch.completions, batch.events, batch.rows)
        except StateNotSaved as exc:
            with self._lock:
                self.saves_failed += 1
                if self.saves_failing_since is None:
                    self.saves_failing_since = batch.now
                # Memory goes back to what the store holds: every change since the last commit is
                # gone, including those made while this one was being written.
                self._failed.append((self._settled + 1, self._changes, str(exc)))
                self._settled = self._changes
                self._roll_back(self._last_now)
            return
        with self._lock:
            self._settled = batch.through
            self.saves_failing_since = None
            self.view = batch.view
            self.events.publish(batch.last_event)

    def _record(self, now: float) -> JobRecord:
        return JobRecord(
            spec=self.spec,
            state=self._state,
            failure=self._failure,
            dead_count=self._dead_count,
            samples=self._progress.samples,
            training_seconds=self._training_seconds(now),
            evaluator=self._evaluator,
            evaluation=self._evaluation,
            last_epoch_announced=self._last_epoch_announced,
            leases_granted=self.leases_granted,
            heartbeats_missed=self.heartbeats_missed,
            leases_expired=self.leases_expired,
            layout=self._layout,
            next_event_sequence=self.events.next_sequence,
            servers=self._fleet.record(),
            checkpoints=self._checkpoints.manifest.to_state(),
            validation=tuple(self._validation),
            validation_due=self._validation_due,
            stopped_early=self._stopped_early,
        )

    def _roll_back(self, now: float) -> None:
        """After a change that could not be committed: the in-memory state becomes what the store
        holds (what a restart would load), so the caller's retry meets the state before its call."""
        assert self._store is not None
        self.events.discard_staged()
        self._unsaved_completions.clear()
        saved = self._store.load()  # reads still work on a full disk; a failure here is StateNotSaved too
        if saved is not None:
            self._load(decode(saved, self._specs), now)
        self._members.dirty.clear()  # memory is what the store holds
        self._ledger.dirty.clear()

    def _restore(self, saved: SavedJob, now: float) -> None:
        record = decode(saved, self._specs)
        if record.job.spec != self.spec:
            raise ConfigError(
                "the state directory holds a different job "
                f"({record.job.spec}); restart with the same job settings or use a new --state-dir"
            )
        self._load(record, now)
        self.events.restore(record.events)
        self.restored = True
        self.events.append(
            EventKind.JOB_STATE_CHANGED,
            f"coordinator restarted; job {self._state.name.lower()} restored at epoch {self._ledger.epoch}",
            job_state=self._state.name,
        )
        self._persist(now)  # rewrites every row: an older format is saved in the current one
        self._await(self._changes)

    def _load(self, record: StateRecord, now: float) -> None:
        """Replaces the control state with a saved one (at a restart, or to undo a change the
        store refused); the event history is the caller's business."""
        job = record.job
        self._state = job.state
        self._failure = job.failure
        self._dead_count = job.dead_count
        self._progress.samples = job.samples
        self._train_started = self._train_ended = None
        if self._state in (JobState.TRAINING, JobState.EVALUATING, JobState.SUCCEEDED, JobState.FAILED):
            self._train_started = now - job.training_seconds
            if self._state is not JobState.TRAINING:
                self._train_ended = now
        self._evaluator = job.evaluator
        self._evaluation = job.evaluation
        self._validation = list(job.validation)
        self._validation_due = job.validation_due
        self._stopped_early = job.stopped_early
        self._last_epoch_announced = job.last_epoch_announced
        self.leases_granted = job.leases_granted
        self.heartbeats_missed = job.heartbeats_missed
        self.leases_expired = job.leases_expired
        self._layout = job.layout
        self._fleet.restore(job.servers, now)
        self._checkpoints.manifest.restore(job.checkpoints, now)
        self.events.resume_from(job.next_event_sequence)
        self._members.restore(record.members, now)
        self._ledger.restore(record.ledger, record.completions, now)

    def _training_seconds(self, now: float) -> float:
        if self._train_started is None:
            return 0.0
        end = self._train_ended if self._train_ended is not None else now
        return end - self._train_started

    @property
    def layout_version(self) -> int:
        return self._layout.version if self._layout is not None else 0
