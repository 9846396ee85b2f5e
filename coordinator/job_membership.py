"""Who is in a coordinator job: registering, heartbeats, departures, and declaring the silent dead
(with their shards requeued and the parameter servers fenced against them)."""

from __future__ import annotations

import dataclasses

import structlog

from coordinator.events import EventKind
from coordinator.job_lifecycle import LifecycleOps
from coordinator.job_types import HeartbeatReply, JobState
from coordinator.layout import balance
from coordinator.membership import Member, Role
from lepton.domain import CheckpointReport
from lepton.errors import FailedPrecondition, InvalidArgument

log = structlog.get_logger("lepton.coordinator")
MAX_INSTANCE_CHARS = 253  # a DNS name (a pod name is one)


class MembershipOps(LifecycleOps):
    """Member operations of a Job (under its lock, each change committed before it answers;
    a worker's heartbeat takes neither the lock nor a commit)."""

    def register(
        self,
        role: Role,
        address: str,
        now: float,
        member_id: str = "",
        hostname: str = "",
        pid: int = 0,
        instance: str = "",
    ) -> Member:
        if pid < 0:
            raise InvalidArgument(f"pid must be >= 0 (0: not given), got {pid}")
        if len(instance) > MAX_INSTANCE_CHARS:
            raise InvalidArgument(
                f"instance has at most {MAX_INSTANCE_CHARS} characters, got {len(instance)}"
            )
        with self._changing():
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
                    self._fleet.restarts += 1
            member = self._members.register(role, address, now, member_id, hostname, pid, instance)
            self.events.append(
                EventKind.MEMBER_REGISTERED,
                f"{member.member_id} ({role.value}) registered, incarnation {member.incarnation}",
                member_id=member.member_id,
                incarnation=member.incarnation,
            )
            if role is Role.PARAMETER_SERVER:
                self._fleet.ready.discard(member.member_id)
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
        interval_s = self.spec.heartbeat_interval_s
        known = self._members.get(member_id)
        if checkpoint is None and known is not None and known.role is Role.WORKER:
            # The liveness path: the membership table's own lock, then the last committed view.
            # The worker's lease is renewed from this heartbeat by the next tick.
            directed_s = self._liveness.announced()
            self._members.heartbeat(member_id, incarnation, now, directed_s)
            view = self.view
            return HeartbeatReply(view.state, view.layout_version, (), view.fence_version, interval_s=directed_s)
        with self._changing():
            if checkpoint is not None:
                checkpoint.check()  # a malformed report rejects the heartbeat before anything changes
                if known is not None and known.role is not Role.PARAMETER_SERVER:
                    raise InvalidArgument("only parameter servers report checkpoints")
            member = self._members.heartbeat(member_id, incarnation, now, interval_s)
            view = self.view
            if member.role is Role.PARAMETER_SERVER:
                self._fleet.heard(member_id, version, roster_version)
                self._wake_lease_waiters()  # an acknowledged revocation may free new leases
                if member_id in self._fleet.ready:
                    self._checkpoints.manifest.observe(member_id, version, now)
                if checkpoint is not None:
                    self._record_checkpoint(member_id, incarnation, checkpoint, now)
                order = self._checkpoints.manifest.order(self._training_moves(), now)
                return HeartbeatReply(view.state, view.layout_version, view.workers, view.fence_version, order)
            return HeartbeatReply(view.state, view.layout_version, (), view.fence_version)

    def deregister(self, member_id: str, incarnation: int, now: float) -> int:
        """A graceful leave: the member's leases go back to the queue at once."""
        with self._changing():
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
        is over members leave by themselves: nobody is declared dead any more. Also commits the
        changes nobody waited for (progress reports). Raises StateNotSaved if that commit fails."""
        with self._changing():
            dead = self._judge(now)
        self.flush()
        return dead

    def _judge(self, now: float) -> list[Member]:
        last, self._last_tick = self._last_tick, now
        if self._state.terminal:
            return []
        threshold = self.stall_threshold_s
        if threshold is not None and last is not None and now - last > threshold:
            # Judged right after: a member heard before the stall is no later than usual, and
            # one silent before it still dies even if every tick comes late.
            self._excuse_stall(now - last, now)
        self._liveness.update(sum(1 for m in self._members.members(Role.WORKER) if m.alive), now)
        worker_timeout_s = self._liveness.worker_timeout_s(now)
        dead = [
            (m, f"{worker_timeout_s if m.role is Role.WORKER else self.spec.heartbeat_timeout_s:g}s without heartbeat")
            for m in self._members.expire(now, worker_timeout_s)
        ]
        self._ledger.renew_from(self._members.heard_since, now)  # heartbeats renew their leases
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
        for server in self._fleet.overdue(now):
            if not self._state.terminal:
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
        self._fleet.excuse(stall_s, now)
        log.warning("coordinator_stall_detected", gap_s=round(gap_s, 3), excused_s=round(stall_s, 3))

    def _expire_leases(self, now: float) -> list[Member]:
        """Holders of leases past their deadline, fenced (marked dead) so that their shards move
        on only after the servers refuse them, like any dead member's."""
        fenced = []
        for lease in self._ledger.expired(now):
            member = self._members.get(lease.member_id)
            if member is None or not member.alive or member.incarnation != lease.incarnation:
                continue
            self._members.fence(member)
            self.leases_expired += 1
            fenced.append(member)
        return fenced

    def _forget(self, member_id: str, now: float, *, departed: bool, why: str) -> int:
        member = self._members.get(member_id)
        if member is None:
            return 0
        if member.role is Role.PARAMETER_SERVER:
            self._fleet.ready.discard(member_id)
            if self._layout is not None and member_id in self._layout.servers and not self._state.terminal:
                # Training pauses (no new leases) until the server is back from its checkpoint.
                self._fleet.lose(member_id, now)
                self.events.append(
                    EventKind.JOB_STATE_CHANGED,
                    f"parameter server {member_id} {why}; waiting up to {self.ps_recovery_timeout_s:g}s "
                    "for it to restart from its checkpoint",
                    member_id=member_id,
                    incarnation=member.incarnation,
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
            self._fleet.revoke()
        if self._ledger.epoch != epoch_before:  # a quarantine ended the epoch
            self._epoch_ended(epoch_before, now)
        if self._evaluator is not None and self._evaluator[0] == member_id:
            self._evaluator = None
        return len(moved)

    def _worker(self, member_id: str, incarnation: int) -> Member:
        member = self._members.check(member_id, incarnation)
        if member.role is not Role.WORKER:
            raise FailedPrecondition(f"{member_id} is not a worker")
        return member
