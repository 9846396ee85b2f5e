"""The coordinator's domain: one training job's membership, ledger, layout, lifecycle and events.

Every operation takes ``now`` (monotonic seconds) and runs under one lock; servicers call exactly
one method per RPC. Nothing here knows about gRPC.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import structlog
import torch

from coordinator.checkpoints import Checkpoint, CheckpointManifest
from coordinator.events import Event, EventKind, EventLog
from coordinator.layout import Layout, balance
from coordinator.ledger import Completion, Lease, ShardLedger
from coordinator.membership import Member, MembershipTable
from lepton.tensors import TensorKind, TensorSpec, part, row_slice
from coordinator.store import JobStore, SavedCompletion, SavedJob
from lepton.config import JobSpec, job_from_mapping
from lepton.domain import CheckpointReport, HeartbeatReply, JobState, LeaseOutcome, Role, WorkerView
from lepton.errors import ConfigError, DuplicateCompletion, FailedPrecondition, InvalidArgument, StateNotSaved
from lepton.optimizers import Granularity, granularity
from lepton.tasks import REGRESSION, Evaluation

log = structlog.get_logger("lepton.coordinator")

MAX_FAILURE_REASON_CHARS = 2000


@dataclass(frozen=True)
class LeaseDecision:
    outcome: LeaseOutcome
    lease: Lease | None = None
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class Assignment:
    layout_version: int
    tensors: tuple[TensorSpec, ...]
    values: Mapping[str, torch.Tensor]


# What the evaluating worker reports: the task's metrics (lepton.tasks).
EvaluationResult = Evaluation


def evaluation_problem(result: EvaluationResult) -> str | None:
    """Why a reported evaluation cannot be true, or None."""
    if not (math.isfinite(result.loss) and result.samples >= 0):
        return "the evaluation's loss must be finite and its samples >= 0"
    if not (math.isfinite(result.inference_samples_per_second) and result.inference_samples_per_second >= 0):
        return "inference_samples_per_second must be a finite number >= 0"
    if result.task == REGRESSION:
        values = (result.mse, result.mae, result.r2)
        if any(v is None or not math.isfinite(v) for v in values) or result.mse < 0 or result.mae < 0 or result.r2 > 1:  # type: ignore[operator]
            return "regression metrics need mse >= 0, mae >= 0 and r2 <= 1"
        return None
    if not (0.0 <= (result.accuracy or 0.0) <= 1.0 and 0.0 <= (result.macro_recall or 0.0) <= 1.0):
        return "accuracy and macro_recall must lie in [0, 1]"
    if any(not 0.0 <= r <= 1.0 for r in result.per_class_recall if r == r):  # NaN: class absent
        return "per_class_recall must lie in [0, 1]"
    sizes = {len(row) for row in result.confusion_matrix}
    if result.confusion_matrix and sizes != {len(result.confusion_matrix)}:
        return "confusion_matrix must be square"
    if any(c < 0 for row in result.confusion_matrix for c in row):
        return "confusion_matrix counts must be >= 0"
    return None


def describe_evaluation(result: EvaluationResult) -> str:
    """The headline metrics as one line of text (events, logs)."""
    if result.task == REGRESSION:
        return f"mse {result.mse:.4f}, mae {result.mae:.4f}, r2 {result.r2:.4f}, loss {result.loss:.4f}"
    return f"accuracy {result.accuracy:.4f}, macro recall {result.macro_recall:.4f}, loss {result.loss:.4f}"


@dataclass(frozen=True)
class MemberSnapshot:
    member: Member
    heartbeat_age_s: float
    lease: Lease | None


@dataclass(frozen=True)
class JobStatus:
    spec: JobSpec
    state: JobState
    epoch: int
    shards_completed_in_epoch: int
    shards_leased: int
    shards_pending: int
    shard_completions: int
    duplicate_completions_rejected: int
    reassignments: int
    members_declared_dead: int
    samples_trained: int
    samples_per_second: float
    recent_loss: float
    training_seconds: float
    layout_version: int
    members: tuple[MemberSnapshot, ...]
    evaluation: EvaluationResult | None
    failure: str = ""
    ps_restarts: int = 0
    steps_rolled_back: int = 0
    quarantined_shards: tuple[int, ...] = ()
    leases_expired: int = 0
    last_checkpoint: Checkpoint | None = None  # the newest complete coordinated checkpoint


def _check_observation(what: str, loss: float, samples: int, most: int) -> None:
    """A reported mean loss and the samples it averages over: finite, and 0..``most`` samples
    (no report covers more samples than its shard holds). Raises InvalidArgument."""
    if not math.isfinite(loss):
        raise InvalidArgument(f"{what}: loss must be a finite number, got {loss}; send samples=0 for no loss")
    if not 0 <= samples <= most:
        raise InvalidArgument(f"{what}: samples must lie in [0, {most}] (the shard's size), got {samples}")


@dataclass
class _Progress:
    samples: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=32))  # (loss, samples)

    def add(self, loss: float, samples: int) -> None:
        if samples > 0:
            self.recent.append((loss, samples))

    @property
    def recent_loss(self) -> float:
        total = sum(n for _, n in self.recent)
        return sum(l * n for l, n in self.recent) / total if total else float("nan")


class Job:
    """One job's control-plane state. Thread-safe.

    Raises (from its methods) NotFound, Fenced, FailedPrecondition, DuplicateCompletion and
    InvalidArgument, which the RPC layer maps to status codes.
    """

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
        self._wall_clock = wall_clock
        self._checkpoints = CheckpointManifest(spec.mode, spec.heartbeat_interval_s)
        self.events = events or EventLog(staged=True)
        self._lock = threading.RLock()
        self._members = MembershipTable(spec.heartbeat_timeout_s)
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
        self._ready: set[str] = set()
        self._state = JobState.WAITING_FOR_SERVERS
        self._failure = ""
        self._dead_count = 0
        self._progress = _Progress()
        self._train_started: float | None = None
        self._train_ended: float | None = None
        self._evaluator: tuple[str, int] | None = None
        self._evaluation: EvaluationResult | None = None
        self._last_epoch_announced = -1
        self.leases_granted = 0
        self.heartbeats_missed = 0
        self.ps_restarts = 0
        self.steps_rolled_back = 0
        self.leases_expired = 0
        self.saves_failed = 0  # changes the store could not commit (rolled back, callers told to retry)
        self.saves_failing_since: float | None = None  # when the current run of refused commits began
        self.ps_recovery_timeout_s = max(30.0, 10 * spec.heartbeat_timeout_s)
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
        self._ps_versions: dict[str, int] = {}
        self._ps_lost_at: dict[str, float] = {}
        # Fencing order: each requeue after a death or departure bumps _fence_version; new leases
        # wait until every ready server has applied a roster at least that new (its heartbeat
        # acknowledges the version), so a zombie's pushes are refused before its shard moves on.
        self._fence_version = 0
        self._roster_acks: dict[str, int] = {}
        self._store = store
        self.restored = False
        saved = store.load() if store is not None else None
        if saved is not None:
            self._restore(saved, now)
        else:
            self._persist(now)

    # --- durability ----------------------------------------------------------------------------

    def _persist(self, now: float, completion: Completion | None = None) -> None:
        """Writes the control state in one transaction (called under the lock, before answering)."""
        if self._store is None:
            self.events.publish()
            return
        layout = None
        if self._layout is not None:
            layout = {
                "version": self._layout.version,
                "servers": list(self._layout.servers),
                "assignment": {
                    s: [[t.of, *t.rows] if t.is_slice else t.name for t in ts]
                    for s, ts in self._layout.assignment.items()
                },
            }
        job = {
            "spec": {**dataclasses.asdict(self.spec), "optimizer_kwargs": dict(self.spec.optimizer_kwargs)},
            "state": self._state.name,
            "failure": self._failure,
            "dead_count": self._dead_count,
            "samples": self._progress.samples,
            "training_seconds": self._training_seconds(now),
            "evaluator": list(self._evaluator) if self._evaluator else None,
            "evaluation": dataclasses.asdict(self._evaluation) if self._evaluation else None,
            "last_epoch_announced": self._last_epoch_announced,
            "leases_granted": self.leases_granted,
            "heartbeats_missed": self.heartbeats_missed,
            "layout": layout,
            "ready": sorted(self._ready),
            "next_event_sequence": self.events.next_sequence,
            "ps_restarts": self.ps_restarts,
            "steps_rolled_back": self.steps_rolled_back,
            "leases_expired": self.leases_expired,
            "ps_versions": self._ps_versions,
            "ps_lost": sorted(self._ps_lost_at),
            "fence_version": self._fence_version,
            "checkpoints": self._checkpoints.to_state(),
        }
        extra = [SavedCompletion(completion.epoch, completion.shard, completion.member_id, completion.incarnation)] if completion else []
        try:
            self._store.save(
                {"job": job, "members": self._members.to_state(), "ledger": self._ledger.to_state()},
                extra,
                [event.to_dict() for event in self.events.staged()],
            )
        except StateNotSaved:
            self.saves_failed += 1
            if self.saves_failing_since is None:
                self.saves_failing_since = now
            self._roll_back(now)
            raise
        self.saves_failing_since = None
        self.events.publish()

    def _roll_back(self, now: float) -> None:
        """After a change that could not be committed: the in-memory state becomes what the store
        holds (what a restart would load), so the caller's retry meets the state before its call."""
        assert self._store is not None
        self.events.discard_staged()
        saved = self._store.load()  # reads still work on a full disk; a failure here is StateNotSaved too
        if saved is not None:
            self._load_documents(saved, now)

    def _restore(self, saved: SavedJob, now: float) -> None:
        job = saved.documents["job"]
        spec = job_from_mapping(job["spec"])
        if spec != self.spec:
            raise ConfigError(
                "the state directory holds a different job "
                f"({spec}); restart with the same job settings or use a new --state-dir"
            )
        self._load_documents(saved, now)
        self.events.restore([Event.from_dict(body) for body in saved.events])
        self.restored = True
        self.events.append(
            EventKind.JOB_STATE_CHANGED,
            f"coordinator restarted; job {self._state.name.lower()} restored at epoch {self._ledger.epoch}",
            job_state=self._state.name,
        )
        self._persist(now)

    def _load_documents(self, saved: SavedJob, now: float) -> None:
        """Replaces the control state with the saved documents (at a restart, or to undo a change
        the store refused); the event history is the caller's business."""
        job = saved.documents["job"]
        self._state = JobState[job["state"]]
        self._failure = job["failure"]
        self._dead_count = job["dead_count"]
        self._progress.samples = job["samples"]
        self._train_started = self._train_ended = None
        if self._state in (JobState.TRAINING, JobState.EVALUATING, JobState.SUCCEEDED, JobState.FAILED):
            self._train_started = now - job["training_seconds"]
            if self._state is not JobState.TRAINING:
                self._train_ended = now
        self._evaluator = tuple(job["evaluator"]) if job["evaluator"] else None  # type: ignore[assignment]
        self._evaluation = EvaluationResult.from_state(job["evaluation"]) if job["evaluation"] else None
        self._last_epoch_announced = job["last_epoch_announced"]
        self.leases_granted = job["leases_granted"]
        self.heartbeats_missed = job["heartbeats_missed"]
        self._layout = None
        if job["layout"] is not None:
            specs = {s.name: s for s in self._specs}
            layout = job["layout"]
            self._layout = Layout(
                layout["version"],
                tuple(layout["servers"]),
                {
                    s: tuple(specs[n] if isinstance(n, str) else row_slice(specs[n[0]], n[1], n[2]) for n in names)
                    for s, names in layout["assignment"].items()
                },
            )
        self._ready = set(job["ready"])
        self.ps_restarts = job.get("ps_restarts", 0)
        self.steps_rolled_back = job.get("steps_rolled_back", 0)
        self.leases_expired = job.get("leases_expired", 0)
        self._ps_versions = dict(job.get("ps_versions", {}))
        self._ps_lost_at = {s: now for s in job.get("ps_lost", [])}
        self._fence_version = job.get("fence_version", 0)
        if "checkpoints" in job:
            self._checkpoints.restore(job["checkpoints"], now)
        self.events.resume_from(job["next_event_sequence"])
        self._members.restore(saved.documents["members"], now)
        self._ledger.restore(
            saved.documents["ledger"],
            [Completion(c.epoch, c.shard, c.member_id, c.incarnation) for c in saved.completions],
            now,
        )

    def _training_seconds(self, now: float) -> float:
        if self._train_started is None:
            return 0.0
        end = self._train_ended if self._train_ended is not None else now
        return end - self._train_started

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def state(self) -> JobState:
        with self._lock:
            return self._state

    def _set_state(self, state: JobState, now: float, why: str = "") -> None:
        if state is self._state or self._state.terminal:  # a finished job stays finished
            return
        self._state = state
        if state is JobState.TRAINING and self._train_started is None:
            self._train_started = now
        if state in (JobState.EVALUATING, JobState.FAILED) and self._train_ended is None:
            self._train_ended = now
        self.events.append(
            EventKind.JOB_STATE_CHANGED,
            f"job {state.name.lower()}" + (f": {why}" if why else ""),
            job_state=state.name,
        )
        if state is JobState.TRAINING:
            self._announce_epoch()
        if state is JobState.EVALUATING and self._layout is not None:
            # Training is over: the servers snapshot their final parameters (what `lepton export`
            # turns into a state_dict), coalesced with a checkpoint already pending.
            self._request_checkpoint(now, "final", final=True)

    def _announce_epoch(self) -> None:
        if not self._ledger.finished and self._ledger.epoch != self._last_epoch_announced:
            self._last_epoch_announced = self._ledger.epoch
            self.events.append(
                EventKind.EPOCH_STARTED, f"epoch {self._ledger.epoch} started", epoch=self._ledger.epoch
            )

    # --- membership ----------------------------------------------------------------------------

    def register(
        self,
        role: Role,
        address: str,
        now: float,
        member_id: str = "",
        hostname: str = "",
        pid: int = 0,
    ) -> Member:
        if pid < 0:
            raise InvalidArgument(f"pid must be >= 0 (0: not given), got {pid}")
        with self._lock:
            if role is Role.PARAMETER_SERVER:
                if not address or ":" not in address:
                    raise InvalidArgument("a parameter server must give the host:port workers dial")
                known = self._members.get(member_id) if member_id else None
                in_layout = self._layout is not None and member_id in self._layout.servers
                if self._layout is not None and not in_layout:
                    raise FailedPrecondition(
                        f"the job already has its {self.spec.parameter_servers} parameter servers"
                    )
                if known is None and self._layout is None and len(
                    self._members.alive(Role.PARAMETER_SERVER)
                ) >= self.spec.parameter_servers:
                    raise FailedPrecondition(
                        f"the job needs only {self.spec.parameter_servers} parameter servers"
                    )
            previous = self._members.get(member_id) if member_id else None
            if previous is not None:
                if previous.role is not role:
                    raise InvalidArgument(
                        f"member {member_id} registered as {previous.role.value}, not {role.value}"
                    )
                self._forget(member_id, now, departed=False, why="re-registered")
                if role is Role.PARAMETER_SERVER and self._layout is not None and member_id in self._layout.servers:
                    # A restarted server: same tensors, new address; workers re-read the layout.
                    self._layout = dataclasses.replace(self._layout, version=self._layout.version + 1)
                    self.ps_restarts += 1
            member = self._members.register(role, address, now, member_id, hostname, pid)
            self.events.append(
                EventKind.MEMBER_REGISTERED,
                f"{member.member_id} ({role.value}) registered, incarnation {member.incarnation}",
                member_id=member.member_id,
                incarnation=member.incarnation,
            )
            if role is Role.PARAMETER_SERVER:
                self._ready.discard(member.member_id)
                self._maybe_decide_layout(now)
            self._persist(now)
            return member

    def _maybe_decide_layout(self, now: float) -> None:
        if self._layout is not None:
            return
        servers = [m.member_id for m in self._members.alive(Role.PARAMETER_SERVER)]
        if len(servers) < self.spec.parameter_servers:
            return
        self._layout = balance(self._specs, servers, version=1, whole_tensors=self._whole_tensors)
        self._set_state(JobState.INITIALIZING, now)

    def heartbeat(
        self,
        member_id: str,
        incarnation: int,
        now: float,
        version: int = 0,
        roster_version: int = 0,
        checkpoint: CheckpointReport | None = None,
    ) -> HeartbeatReply:
        """Renews a member. Parameter servers also report the version they serve and their answer
        to a checkpoint order, and get the worker roster and the pending checkpoint order back."""
        if version < 0 or roster_version < 0:
            raise InvalidArgument(f"version and roster_version must be >= 0, got {version} and {roster_version}")
        with self._lock:
            if checkpoint is not None:
                checkpoint.check()  # a malformed report rejects the heartbeat before anything changes
                known = self._members.get(member_id)
                if known is not None and known.role is not Role.PARAMETER_SERVER:
                    raise InvalidArgument("only parameter servers report checkpoints")
            previous = self._members.get(member_id)
            gap = now - previous.last_heartbeat if previous is not None else 0.0
            member = self._members.heartbeat(member_id, incarnation, now)
            self.heartbeats_missed += max(0, int(gap / self.spec.heartbeat_interval_s) - 1)
            workers: tuple[WorkerView, ...] = ()
            if member.role is Role.WORKER:
                self._ledger.renew(member_id, incarnation, now)
            if member.role is Role.PARAMETER_SERVER:
                if member_id in self._ready:
                    self._ps_versions[member_id] = max(version, self._ps_versions.get(member_id, 0))
                self._roster_acks[member_id] = roster_version
                workers = tuple(
                    WorkerView(m.member_id, m.incarnation, m.alive)
                    for m in self._members.members(Role.WORKER)
                )
                if member_id in self._ready:
                    self._checkpoints.observe(member_id, version, now)
                if checkpoint is not None:
                    self._record_checkpoint(member_id, checkpoint, now)
                order = self._checkpoints.order(self._training_moves(), now)
                return HeartbeatReply(self._state, self.layout_version, workers, self._fence_version, order)
            return HeartbeatReply(self._state, self.layout_version, workers, self._fence_version)

    def deregister(self, member_id: str, incarnation: int, now: float) -> int:
        """A graceful leave: the member's leases go back to the queue at once."""
        with self._lock:
            member = self._members.depart(member_id, incarnation)
            moved = self._forget(member.member_id, now, departed=True, why="left")
            self.events.append(
                EventKind.MEMBER_DEPARTED,
                f"{member_id} departed",
                member_id=member_id,
                incarnation=incarnation,
            )
            self._persist(now)
            return moved

    def tick(self, now: float) -> list[Member]:
        """Declares silent members dead and requeues their work; returns the dead. Once the job
        is over members leave by themselves: nobody is declared dead any more."""
        with self._lock:
            last, self._last_tick = self._last_tick, now
            if self._state.terminal:
                return []
            threshold = self.stall_threshold_s
            if threshold is not None and last is not None and now - last > threshold:
                # Judged right after: a member heard before the stall is no later than usual, and
                # one silent before it still dies even if every tick comes late.
                self._excuse_stall(now - last, now)
            dead = [(m, f"{self.spec.heartbeat_timeout_s:g}s without heartbeat") for m in self._members.expire(now)]
            dead += [(m, f"{self.spec.lease_timeout_s:g}s without renewing its lease") for m in self._expire_leases(now)]
            for member, why in dead:
                self._dead_count += 1
                self.events.append(
                    EventKind.MEMBER_DECLARED_DEAD,
                    f"{member.member_id} incarnation {member.incarnation} declared dead after {why}",
                    member_id=member.member_id,
                    incarnation=member.incarnation,
                )
                self._forget(member.member_id, now, departed=False, why="declared dead")
            failed = False
            for server, since in list(self._ps_lost_at.items()):
                if now - since > self.ps_recovery_timeout_s and not self._state.terminal:
                    self._failure = (
                        f"parameter server {server} did not come back within {self.ps_recovery_timeout_s:g}s"
                    )
                    self._set_state(JobState.FAILED, now, self._failure)
                    failed = True
            if dead or failed:
                self._persist(now)
            return [member for member, _ in dead]

    def _excuse_stall(self, gap_s: float, now: float) -> None:
        """Grants every member, lease and lost server the time the coordinator was away (the gap
        less one normal tick), so only silence it was awake to hear counts against them."""
        stall_s = gap_s - self.tick_interval_s
        self.stalls_detected += 1
        self._members.excuse(stall_s, now)
        self._ledger.excuse(stall_s, now)
        for server, since in self._ps_lost_at.items():
            self._ps_lost_at[server] = min(since + stall_s, now)
        log.warning("coordinator_stall_detected", gap_s=round(gap_s, 3), excused_s=round(stall_s, 3))

    def _expire_leases(self, now: float) -> list[Member]:
        """Holders of leases past their deadline, fenced (marked dead) so that their shards move
        on only after the servers refuse them, like any dead member's."""
        fenced = []
        for lease in self._ledger.expired(now):
            member = self._members.get(lease.member_id)
            if member is None or not member.alive or member.incarnation != lease.incarnation:
                continue
            member.alive = False
            self.leases_expired += 1
            fenced.append(member)
        return fenced

    def _forget(self, member_id: str, now: float, *, departed: bool, why: str) -> int:
        member = self._members.get(member_id)
        if member is None:
            return 0
        if member.role is Role.PARAMETER_SERVER:
            self._ready.discard(member_id)
            if self._layout is not None and member_id in self._layout.servers and not self._state.terminal:
                # Training pauses (no new leases) until the server is back from its checkpoint.
                self._ps_lost_at.setdefault(member_id, now)
                self.events.append(
                    EventKind.JOB_STATE_CHANGED,
                    f"parameter server {member_id} {why}; waiting up to {self.ps_recovery_timeout_s:g}s "
                    "for it to restart from its checkpoint",
                    member_id=member_id,
                    job_state=self._state.name,
                )
            return 0
        epoch_before = self._ledger.epoch
        moved = self._ledger.requeue(member_id, died=why == "declared dead")
        for lease in moved:
            quarantined = lease.shard.index in self._ledger.quarantined
            self.events.append(
                EventKind.SHARD_QUARANTINED if quarantined else EventKind.SHARD_REQUEUED,
                (
                    f"shard {lease.shard.index} quarantined: {self._ledger.max_attempts} holders died "
                    f"on it (last {member_id})"
                    if quarantined
                    else f"shard {lease.shard.index} of epoch {lease.epoch} requeued at offset "
                    f"{lease.offset} ({member_id} {why})"
                ),
                member_id=member_id,
                incarnation=lease.incarnation,
                epoch=lease.epoch,
                shard=lease.shard.index,
                offset=lease.offset,
            )
        if moved and not departed:
            # A fenced incarnation may still push (a zombie): the revocation must reach every
            # server before its shards are handed out again. A departed worker stopped by itself.
            self._fence_version += 1
        if self._ledger.epoch != epoch_before:  # a quarantine ended the epoch
            if self._ledger.finished:
                self._set_state(JobState.EVALUATING, now)
            else:
                self._announce_epoch()
        if self._evaluator is not None and self._evaluator[0] == member_id:
            self._evaluator = None
        return len(moved)

    # --- parameter servers ---------------------------------------------------------------------

    def assignment(self, member_id: str, incarnation: int) -> Assignment:
        with self._lock:
            member = self._members.check(member_id, incarnation)
            if member.role is not Role.PARAMETER_SERVER:
                raise FailedPrecondition(f"{member_id} is not a parameter server")
            if self._layout is None:
                raise FailedPrecondition(
                    "no layout yet: waiting for "
                    f"{self.spec.parameter_servers - len(self._members.alive(Role.PARAMETER_SERVER))}"
                    " more parameter server(s) to register"
                )
            specs = self._layout.tensors_of(member_id)
            return Assignment(
                self._layout.version, specs, {s.name: part(self._initial, s) for s in specs}
            )

    def ready(self, member_id: str, incarnation: int, layout_version: int, now: float, version: int = 0) -> None:
        with self._lock:
            member = self._members.check(member_id, incarnation)
            if member.role is not Role.PARAMETER_SERVER:
                raise FailedPrecondition(f"{member_id} is not a parameter server")
            if self._layout is None or layout_version != self._layout.version:
                raise FailedPrecondition(
                    f"layout version {layout_version} is not current ({self.layout_version})"
                )
            self._ready.add(member_id)
            self._ps_lost_at.pop(member_id, None)
            last = self._ps_versions.get(member_id, 0)
            if version < last:
                self.steps_rolled_back += last - version
            self._ps_versions[member_id] = version
            if self._state is JobState.INITIALIZING and self._ready >= set(self._layout.servers):
                self._set_state(JobState.TRAINING, now)
            self._persist(now)

    @property
    def layout_version(self) -> int:
        return self._layout.version if self._layout is not None else 0

    def layout(self) -> tuple[Layout, dict[str, str]]:
        """The layout and each server's address. Raises FailedPrecondition before it exists."""
        with self._lock:
            if self._layout is None:
                raise FailedPrecondition("no layout yet: parameter servers are still registering")
            addresses = {}
            for server in self._layout.servers:
                member = self._members.get(server)
                addresses[server] = member.address if member else ""
            return self._layout, addresses

    # --- workers -------------------------------------------------------------------------------

    def _worker(self, member_id: str, incarnation: int) -> Member:
        member = self._members.check(member_id, incarnation)
        if member.role is not Role.WORKER:
            raise FailedPrecondition(f"{member_id} is not a worker")
        return member

    def _shard_size(self, shard: int) -> int:
        shards = self._ledger.shards
        return shards[shard].size if 0 <= shard < len(shards) else max(s.size for s in shards)

    def lease(self, member_id: str, incarnation: int, now: float) -> LeaseDecision:
        with self._lock:
            self._worker(member_id, incarnation)
            wait = LeaseDecision(LeaseOutcome.WAIT, retry_after_s=self.spec.heartbeat_interval_s / 2)
            if self._state.terminal:
                return LeaseDecision(LeaseOutcome.JOB_DONE)
            if self._state is JobState.EVALUATING:
                if self._evaluator is None:
                    self._evaluator = (member_id, incarnation)
                    self._persist(now)
                return (
                    LeaseDecision(LeaseOutcome.EVALUATE)
                    if self._evaluator == (member_id, incarnation)
                    else wait
                )
            if self._state is not JobState.TRAINING or self._ps_lost_at:
                return wait  # not started, or a parameter server is restarting
            if any(self._roster_acks.get(s, 0) < self._fence_version for s in self._ready):
                return wait  # a revocation has not reached every server yet
            lease = self._ledger.lease(member_id, incarnation, now)
            if lease is None:
                return wait
            self.leases_granted += 1
            # Staged before the commit, so it is saved with the lease it describes (and dropped
            # with it when the commit fails).
            self.events.append(
                EventKind.SHARD_LEASED,
                f"shard {lease.shard.index} of epoch {lease.epoch} leased to {member_id} at offset "
                f"{lease.offset}",
                member_id=member_id,
                incarnation=incarnation,
                epoch=lease.epoch,
                shard=lease.shard.index,
                offset=lease.offset,
            )
            self._persist(now)
            return LeaseDecision(LeaseOutcome.GRANTED, lease)

    def progress(
        self,
        member_id: str,
        incarnation: int,
        epoch: int,
        shard: int,
        offset: int,
        loss: float,
        samples: int,
        now: float,
        lease_id: int = 0,
    ) -> None:
        with self._lock:
            _check_observation("ReportProgress", loss, samples, self._shard_size(shard))
            member = self._worker(member_id, incarnation)
            member.last_heartbeat = now  # progress proves life as well as a heartbeat does
            gained = self._ledger.progress(member_id, incarnation, epoch, shard, offset, now, lease_id)
            self._progress.samples += gained
            self._progress.add(loss, samples)
            self._persist(now)

    def complete(
        self,
        member_id: str,
        incarnation: int,
        epoch: int,
        shard: int,
        loss: float,
        samples: int,
        now: float,
        lease_id: int = 0,
    ) -> bool:
        """Counts a shard complete; returns whether it finished the epoch."""
        with self._lock:
            _check_observation("CompleteShard", loss, samples, self._shard_size(shard))
            member = self._worker(member_id, incarnation)
            member.last_heartbeat = now
            try:
                gained, epoch_done = self._ledger.complete(member_id, incarnation, epoch, shard, lease_id)
            except DuplicateCompletion as exc:
                self.events.append(
                    EventKind.DUPLICATE_COMPLETION_REJECTED,
                    str(exc),
                    member_id=member_id,
                    incarnation=incarnation,
                    epoch=epoch,
                    shard=shard,
                )
                self._persist(now)
                raise
            self._progress.samples += gained
            self._progress.add(loss, samples)
            self.events.append(
                EventKind.SHARD_COMPLETED,
                f"shard {shard} of epoch {epoch} completed by {member_id}",
                member_id=member_id,
                incarnation=incarnation,
                epoch=epoch,
                shard=shard,
                loss=loss,
            )
            if epoch_done:
                if self._ledger.finished:
                    self._set_state(JobState.EVALUATING, now)
                else:
                    self._announce_epoch()
            self._persist(now, self._ledger.completions[-1])
            return epoch_done

    def report_evaluation(
        self, member_id: str, incarnation: int, result: EvaluationResult, now: float
    ) -> None:
        with self._lock:
            self._worker(member_id, incarnation)
            if self._state is not JobState.EVALUATING or self._evaluator != (member_id, incarnation):
                raise FailedPrecondition(f"{member_id} was not asked to evaluate")
            problem = evaluation_problem(result)
            if problem:
                raise InvalidArgument(problem)
            self._evaluation = result
            self.events.append(
                EventKind.EVALUATED,
                f"test {describe_evaluation(result)} on {result.samples} samples",
                member_id=member_id,
                incarnation=incarnation,
                loss=result.loss,
            )
            self._set_state(JobState.SUCCEEDED, now)
            self._persist(now)

    def cancel(self, reason: str, now: float) -> JobState:
        """Job control: ends an unfinished job as FAILED."""
        if not reason.strip():
            raise InvalidArgument("a cancellation needs a reason")
        with self._lock:
            if not self._state.terminal:
                self._failure = f"cancelled: {reason}"
                self._set_state(JobState.FAILED, now, self._failure)
                self._persist(now)
            return self._state

    def report_failure(self, member_id: str, incarnation: int, reason: str, now: float) -> JobState:
        """A parameter server cannot go on (its optimizer raised): ends an unfinished job as
        FAILED with its reason. Raises InvalidArgument (empty or over-long reason), NotFound,
        Fenced, FailedPrecondition (not a parameter server)."""
        reason = reason.strip()
        if not reason:
            raise InvalidArgument("a failure report needs a reason")
        if len(reason) > MAX_FAILURE_REASON_CHARS:
            raise InvalidArgument(f"a failure reason has at most {MAX_FAILURE_REASON_CHARS} characters")
        with self._lock:
            member = self._members.check(member_id, incarnation)
            if member.role is not Role.PARAMETER_SERVER:
                raise FailedPrecondition(f"{member_id} is not a parameter server; only servers report failures")
            if not self._state.terminal:
                self._failure = f"parameter server {member_id}: {reason}"
                self._set_state(JobState.FAILED, now, self._failure)
                self._persist(now)
            return self._state

    # --- checkpoints ---------------------------------------------------------------------------

    def _training_moves(self) -> bool:
        """Whether workers may still move the servers' versions (a sync target lies ahead)."""
        return self._state is JobState.TRAINING and self._ledger.leased > 0

    def _request_checkpoint(self, now: float, reason: str, final: bool = False) -> tuple[Checkpoint, bool]:
        assert self._layout is not None
        tensors = {s: [t.name for t in self._layout.tensors_of(s)] for s in self._layout.servers}
        checkpoint, new = self._checkpoints.request(
            tensors, self._ps_versions, self._training_moves(), now, self._wall_clock(), reason, final
        )
        if new:
            self.events.append(
                EventKind.CHECKPOINT_REQUESTED,
                f"checkpoint {checkpoint.checkpoint_id} requested"
                + (f" at version {checkpoint.target_version}" if checkpoint.target_version else "")
                + (f": {reason}" if reason else ""),
                job_state=self._state.name,
            )
        return checkpoint, new

    def request_checkpoint(self, reason: str, now: float) -> tuple[Checkpoint, bool]:
        """Job control: asks every parameter server for a checkpoint (or returns the pending one);
        returns it and whether it is new. Raises FailedPrecondition before the layout exists or
        once the job is over, InvalidArgument for an over-long reason."""
        with self._lock:
            if self._layout is None:
                raise FailedPrecondition("no parameter layout yet: nothing to checkpoint; retry once training starts")
            if self._state.terminal:
                raise FailedPrecondition(
                    f"the job is {self._state.name.lower()}: its servers have stopped; "
                    "the final checkpoint (if any) is in GetCheckpoint"
                )
            checkpoint, new = self._request_checkpoint(now, reason.strip())
            if new:
                self._persist(now)
            return checkpoint, new

    def _record_checkpoint(self, member_id: str, report: CheckpointReport, now: float) -> None:
        checkpoint = self._checkpoints.report(member_id, report, now, self._wall_clock())
        if checkpoint is None:
            return
        if checkpoint.error:
            self.events.append(
                EventKind.CHECKPOINT_FAILED,
                f"checkpoint {checkpoint.checkpoint_id} failed: {checkpoint.error}",
                member_id=member_id,
            )
        else:
            versions = ", ".join(f"{r.member_id}@{r.version}" for r in checkpoint.reports.values())
            self.events.append(
                EventKind.CHECKPOINT_COMPLETED,
                f"checkpoint {checkpoint.checkpoint_id} complete ({versions}) after "
                f"{checkpoint.completed_after_s:.2f}s",
                member_id=member_id,
            )
        if self._store is not None and checkpoint.complete:
            checkpoint.manifest_path = self._store.write_manifest(
                checkpoint.checkpoint_id, self._manifest_document(checkpoint)
            )
        self._persist(now)

    def _manifest_document(self, checkpoint: Checkpoint) -> dict:
        """The JSON manifest ``lepton export`` reads: enough to rebuild the model without a cluster."""
        return {
            "format": "lepton-checkpoint-manifest/1",
            **checkpoint.to_state(),
            "consistent": checkpoint.consistent,
            # name -> where a slice's rows go: export concatenates a parameter's slices in row order
            "slices": {
                t.name: {"parameter": t.parameter, "row_offset": t.row_offset, "parameter_shape": list(t.parameter_shape)}
                for t in (self._layout.tensors if self._layout is not None else ())
                if t.is_slice
            },
            "job": {**dataclasses.asdict(self.spec), "optimizer_kwargs": dict(self.spec.optimizer_kwargs)},
            # tied weights: export writes the carried tensor under these state_dict names too
            "tied": self._tied,
            "kinds": {t.name: t.kind.value for t in self._specs},
        }

    def checkpoint(self, checkpoint_id: str = "") -> Checkpoint:
        """The named checkpoint, or the newest complete one for "". Raises InvalidArgument
        (malformed id) and NotFound."""
        with self._lock:
            return self._checkpoints.get(checkpoint_id)

    # --- reading -------------------------------------------------------------------------------

    def status(self, now: float) -> JobStatus:
        with self._lock:
            ledger = self._ledger
            end = self._train_ended if self._train_ended is not None else now
            training_s = end - self._train_started if self._train_started is not None else 0.0
            snapshots = tuple(
                MemberSnapshot(m, now - m.last_heartbeat, ledger.lease_of(m.member_id) if m.alive else None)
                for m in self._members.members()
            )
            return JobStatus(
                spec=self.spec,
                state=self._state,
                epoch=min(ledger.epoch, self.spec.epochs - 1),
                shards_completed_in_epoch=ledger.done_in_epoch,
                shards_leased=ledger.leased,
                shards_pending=ledger.pending,
                shard_completions=len(ledger.completions),
                duplicate_completions_rejected=ledger.duplicates_rejected,
                reassignments=ledger.reassignments,
                members_declared_dead=self._dead_count,
                samples_trained=self._progress.samples,
                samples_per_second=self._progress.samples / training_s if training_s > 0 else 0.0,
                recent_loss=self._progress.recent_loss,
                training_seconds=training_s,
                layout_version=self.layout_version,
                members=snapshots,
                evaluation=self._evaluation,
                failure=self._failure,
                ps_restarts=self.ps_restarts,
                steps_rolled_back=self.steps_rolled_back,
                quarantined_shards=tuple(sorted(ledger.quarantined)),
                leases_expired=self.leases_expired,
                last_checkpoint=self._checkpoints.latest_complete(),
            )

    @property
    def fenced_rejections(self) -> int:
        with self._lock:
            return self._members.fenced_rejections

    def completions(self) -> list[tuple[int, int, str, int]]:
        """Every counted completion as (epoch, shard, member id, incarnation)."""
        with self._lock:
            return [(c.epoch, c.shard, c.member_id, c.incarnation) for c in self._ledger.completions]
