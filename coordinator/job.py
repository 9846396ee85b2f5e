"""The coordinator's domain: one training job's membership, ledger, layout, lifecycle and events.

Every operation takes ``now`` (monotonic seconds) and runs under one lock (a worker's heartbeat
excepted: coordinator/job_membership.py); one that changes durable state answers once its change
is committed (group commit: coordinator/job_base.py). Servicers call exactly one method per RPC.
Nothing here knows about gRPC. ``Job`` holds the operations on the layout, the shards and job
control; it builds on its shared state and how that is saved (job_base.py,
state_codec.py), who is in (job_membership.py), the evaluation
and validations (job_evaluation.py), the parameter servers' loss and fencing (fleet.py),
checkpoints (checkpoints.py) and the value types it answers with (job_types.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from coordinator.checkpoints import Checkpoint
from coordinator.events import EventKind
from coordinator.job_evaluation import EvaluationOps
from coordinator.job_types import (  # noqa: F401 - the job's value types, importable from here
    MAX_FAILURE_REASON_CHARS,
    Assignment,
    EvaluationResult,
    HeartbeatReply,
    JobState,
    JobStatus,
    LeaseDecision,
    LeaseOutcome,
    MemberSnapshot,
    WorkerView,
    check_observation,
    describe_evaluation,
    evaluation_problem,
)
from coordinator.layout import Layout
from coordinator.membership import Role
from lepton.errors import DuplicateCompletion, FailedPrecondition, InvalidArgument, NotReady
from lepton.tensors import part

MAX_LEASE_WAIT_S = 5.0  # the longest a LeaseShard long poll is held
MAX_LEASE_WAITERS = 16  # long polls held at once (each holds an RPC thread); more answer at once


class Job(EvaluationOps):
    """One job's control-plane state. Thread-safe.

    Raises (from its methods) NotFound, Fenced, FailedPrecondition, DuplicateCompletion and
    InvalidArgument, which the RPC layer maps to status codes.
    """

    # --- parameter servers ---------------------------------------------------------------------

    def assignment(self, member_id: str, incarnation: int) -> Assignment:
        with self._lock:
            member = self._members.check(member_id, incarnation)
            if member.role is not Role.PARAMETER_SERVER:
                raise FailedPrecondition(f"{member_id} is not a parameter server")
            if self._layout is None:
                raise NotReady(
                    "no layout yet: waiting for "
                    f"{self.spec.parameter_servers - len(self._members.alive(Role.PARAMETER_SERVER))}"
                    " more parameter server(s) to register",
                    self.spec.heartbeat_interval_s / 2,
                )
            specs = self._layout.tensors_of(member_id)
            return Assignment(
                self._layout.version, specs, {s.name: part(self._initial, s) for s in specs}
            )

    def ready(self, member_id: str, incarnation: int, layout_version: int, now: float, version: int = 0) -> None:
        with self._changing():
            member = self._members.check(member_id, incarnation)
            if member.role is not Role.PARAMETER_SERVER:
                raise FailedPrecondition(f"{member_id} is not a parameter server")
            if self._layout is None or layout_version != self._layout.version:
                raise FailedPrecondition(
                    f"layout version {layout_version} is not current ({self.layout_version})"
                )
            self._fleet.back(member_id, version)
            if self._state is JobState.INITIALIZING and self._fleet.ready >= set(self._layout.servers):
                self._set_state(JobState.TRAINING, now)
            self._persist(now)

    def layout(self) -> tuple[Layout, dict[str, str]]:
        """The layout and each server's address. Raises NotReady before it exists."""
        with self._lock:
            if self._layout is None:
                raise NotReady(
                    "no layout yet: parameter servers are still registering", self.spec.heartbeat_interval_s / 2
                )
            addresses = {}
            for server in self._layout.servers:
                member = self._members.get(server)
                addresses[server] = member.address if member else ""
            return self._layout, addresses

    # --- workers -------------------------------------------------------------------------------

    def _shard_size(self, shard: int) -> int:
        shards = self._ledger.shards
        return shards[shard].size if 0 <= shard < len(shards) else max(s.size for s in shards)

    def lease(
        self, member_id: str, incarnation: int, now: float, max_wait_s: float = 0.0,
        clock: Callable[[], float] | None = None,
    ) -> LeaseDecision:
        """A lease, or WAIT, EVALUATE, JOB_DONE. With ``max_wait_s`` and ``clock`` (monotonic
        seconds) a WAIT is held up to ``max_wait_s`` (at most MAX_LEASE_WAIT_S) while the
        decision could change, and the call decides again whenever the job changes; beyond
        MAX_LEASE_WAITERS waiting calls it answers at once. Raises InvalidArgument for a negative
        or NaN wait."""
        if not max_wait_s >= 0:
            raise InvalidArgument(f"max_wait_s must be >= 0 seconds (0: answer at once), got {max_wait_s}")
        with self._changing():
            decision = self._lease(member_id, incarnation, now)
            if decision.outcome is not LeaseOutcome.WAIT or clock is None or max_wait_s <= 0:
                return decision
            if self._lease_waiters >= MAX_LEASE_WAITERS:
                return decision
            give_up = time.monotonic() + min(max_wait_s, MAX_LEASE_WAIT_S)
            self._lease_waiters += 1
            try:
                while decision.outcome is LeaseOutcome.WAIT:
                    left = give_up - time.monotonic()
                    if left <= 0:
                        break
                    self._job_changed.wait(left)
                    decision = self._lease(member_id, incarnation, clock())
            finally:
                self._lease_waiters -= 1
            if decision.outcome is LeaseOutcome.WAIT:
                return LeaseDecision(LeaseOutcome.WAIT, retry_after_s=0.0)  # waited already: ask again now
            return decision

    def _lease(self, member_id: str, incarnation: int, now: float) -> LeaseDecision:
        self._worker(member_id, incarnation)
        self._members.heartbeat(member_id, incarnation, now)  # asking for work proves life too
        wait = LeaseDecision(LeaseOutcome.WAIT, retry_after_s=self.spec.heartbeat_interval_s / 2)
        if self._state.terminal:
            return LeaseDecision(LeaseOutcome.JOB_DONE)
        if self._state is JobState.EVALUATING:
            if self._evaluator is None and (member_id, incarnation) not in self._declined:
                self._evaluator = (member_id, incarnation)
                self._persist(now)
            return (
                LeaseDecision(LeaseOutcome.EVALUATE)
                if self._evaluator == (member_id, incarnation)
                else wait
            )
        if self._state is not JobState.TRAINING or self._fleet.lost_at:
            return wait  # not started, or a parameter server is restarting
        if self._fleet.revoking:
            return wait  # a revocation has not reached every server yet
        if self._validation_due is not None:
            # A validation is due: no lease until it is in, so nobody moves the model it pulls.
            if self._evaluator is None and (member_id, incarnation) not in self._declined:
                self._evaluator = (member_id, incarnation)
                self._persist(now)
            return LeaseDecision(LeaseOutcome.EVALUATE) if self._evaluator == (member_id, incarnation) else wait
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
        loss: float | None,
        samples: int,
        now: float,
        lease_id: int = 0,
    ) -> None:
        """Records progress on a lease; ``loss`` None: the worker reported none."""
        with self._lock:
            check_observation("ReportProgress", loss, samples, self._shard_size(shard))
            member = self._worker(member_id, incarnation)
            member.last_heartbeat = now  # progress proves life as well as a heartbeat does
            gained = self._ledger.progress(member_id, incarnation, epoch, shard, offset, now, lease_id)
            self._progress.samples += gained
            self._progress.add(loss, samples)
            self._persist(now)  # not waited for: committed with the next batch or tick (docs/failures.md)

    def complete(
        self,
        member_id: str,
        incarnation: int,
        epoch: int,
        shard: int,
        loss: float | None,
        samples: int,
        now: float,
        lease_id: int = 0,
    ) -> bool:
        """Counts a shard complete; returns whether it finished the epoch. ``loss`` None: the
        worker reported none."""
        with self._changing():
            check_observation("CompleteShard", loss, samples, self._shard_size(shard))
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
                offset=self._shard_size(shard),  # every sample of the shard trained
                loss=loss if loss is not None else 0.0,
            )
            if epoch_done:
                self._epoch_ended(epoch, now)
            self._persist(now, self._ledger.completions[-1])
            return epoch_done

    def cancel(self, reason: str, now: float) -> JobState:
        """Job control: ends an unfinished job as FAILED."""
        if not reason.strip():
            raise InvalidArgument("a cancellation needs a reason")
        with self._changing():
            if not self._state.terminal:
                self._failure = f"cancelled: {reason}"
                self._set_state(JobState.FAILED, now, self._failure)
                self._persist(now)
            return self._state

    def report_failure(self, member_id: str, incarnation: int, reason: str, now: float) -> JobState:
        """A parameter server cannot go on (its optimizer raised), or the worker asked to evaluate
        found the model diverged: ends an unfinished job as FAILED with its reason. Raises
        InvalidArgument (empty or over-long reason), NotFound, Fenced, FailedPrecondition (a
        worker that is not the evaluator of a job in EVALUATING)."""
        reason = reason.strip()
        if not reason:
            raise InvalidArgument("a failure report needs a reason")
        if len(reason) > MAX_FAILURE_REASON_CHARS:
            raise InvalidArgument(f"a failure reason has at most {MAX_FAILURE_REASON_CHARS} characters")
        with self._changing():
            member = self._members.check(member_id, incarnation)
            evaluator = self._evaluating(member_id, incarnation)
            if member.role is not Role.PARAMETER_SERVER and not evaluator:
                raise FailedPrecondition(
                    f"{member_id} is not a parameter server; only servers, and the worker asked to "
                    "evaluate, report failures"
                )
            if not self._state.terminal:
                who = "parameter server" if member.role is Role.PARAMETER_SERVER else "worker"
                self._failure = f"{who} {member_id}: {reason}"
                self._set_state(JobState.FAILED, now, self._failure)
                self._persist(now)
            return self._state

    # --- checkpoints ---------------------------------------------------------------------------

    def request_checkpoint(self, reason: str, now: float) -> tuple[Checkpoint, bool]:
        """Job control: asks every parameter server for a checkpoint (or returns the pending one);
        returns it and whether it is new. Raises FailedPrecondition before the layout exists or
        once the job is over, InvalidArgument for an over-long reason."""
        with self._changing():
            if self._layout is None:
                raise NotReady(
                    "no parameter layout yet: nothing to checkpoint; retry once training starts",
                    self.spec.heartbeat_interval_s / 2,
                )
            if self._state.terminal:
                raise FailedPrecondition(
                    f"the job is {self._state.name.lower()}: its servers have stopped; "
                    "the final checkpoint (if any) is in GetCheckpoint"
                )
            checkpoint, new = self._request_checkpoint(now, reason.strip())
            if new:
                self._persist(now)
            return checkpoint, new

    def checkpoint(self, checkpoint_id: str = "") -> Checkpoint:
        """The named checkpoint, or the newest complete one for "". Raises InvalidArgument
        (malformed id) and NotFound."""
        with self._lock:
            return self._checkpoints.manifest.get(checkpoint_id)

    # --- reading -------------------------------------------------------------------------------

    def status(self, now: float) -> JobStatus:
        with self._lock:
            ledger = self._ledger
            end = self._train_ended if self._train_ended is not None else now
            training_s = end - self._train_started if self._train_started is not None else 0.0
            over = self._state.terminal
            timeout_s = self.spec.heartbeat_timeout_s
            snapshots = tuple(
                MemberSnapshot(
                    m,
                    now - m.last_heartbeat,
                    ledger.lease_of(m.member_id) if m.alive else None,
                    m.alive and not (over and now - m.last_heartbeat > timeout_s),
                )
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
                ps_restarts=self._fleet.restarts,
                steps_rolled_back=self._fleet.steps_rolled_back,
                quarantined_shards=tuple(sorted(ledger.quarantined)),
                leases_expired=self.leases_expired,
                last_checkpoint=self._checkpoints.manifest.latest_complete(),
                validation=tuple(self._validation),
                stopped_early=self._stopped_early,
                validating=self._validation_due is not None and not self._state.terminal,
            )

    @property
    def fenced_rejections(self) -> int:
        with self._lock:
            return self._members.fenced_rejections

    def completions(self) -> list[tuple[int, int, str, int]]:
        """Every counted completion as (epoch, shard, member id, incarnation)."""
        with self._lock:
            return [(c.epoch, c.shard, c.member_id, c.incarnation) for c in self._ledger.completions]
