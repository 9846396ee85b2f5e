"""Lease hygiene with a fake clock: lease ids, deadlines renewed by heartbeats and progress, expiry
fencing the holder, restored leases, and the worker's own clock stopping work first."""

from __future__ import annotations

import pytest
import torch

from coordinator.events import EventKind, EventLog
from coordinator.job import Job, LeaseOutcome
from coordinator.ledger import ShardLedger
from coordinator.membership import Role
from coordinator.statedb import SqliteJobStore
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import ConfigError, FailedPrecondition, Fenced
from worker.lease import MARGIN_FRACTION, LeaseClock

# A lease shorter than the heartbeat timeout, so that expiry (not death) is what revokes it.
SPEC = JobSpec(epochs=2, shards_per_epoch=3, parameter_servers=1, heartbeat_interval_s=0.5,
               heartbeat_timeout_s=6.0, lease_timeout_s=2.0)
INITIAL = {"w": torch.zeros(4, 3)}


# --- the ledger ----------------------------------------------------------------------------------


def test_every_lease_gets_a_new_id_and_a_retried_lease_call_the_same_one():
    ledger = ShardLedger(30, 3, 1, lease_timeout_s=5.0)
    a = ledger.lease("w-a", 1, now=10.0)
    again = ledger.lease("w-a", 1, now=11.0)
    b = ledger.lease("w-b", 1, now=11.0)
    assert again is a and a.lease_id == 1 and b.lease_id == 2
    assert a.deadline == 16.0  # the retry renewed it
    ledger.requeue("w-a")
    c = ledger.lease("w-c", 1, now=12.0)
    assert (c.shard.index, c.lease_id) == (a.shard.index, 3)  # same shard, a new id


def test_renewal_and_progress_push_the_deadline_and_expired_lists_only_overdue_leases():
    ledger = ShardLedger(30, 3, 1, lease_timeout_s=5.0)
    a = ledger.lease("w-a", 1, now=0.0)
    b = ledger.lease("w-b", 1, now=0.0)
    assert ledger.renew("w-a", 1, now=3.0) == 1 and ledger.renew("w-a", 2, now=3.0) == 0
    ledger.progress("w-b", 1, 0, b.shard.index, 2, now=4.0, lease_id=b.lease_id)
    assert ledger.expired(5.5) == []
    assert (a.deadline, b.deadline) == (8.0, 9.0)
    assert ledger.expired(8.5) == [a]


def test_a_report_naming_a_revoked_lease_is_refused_and_changes_nothing():
    ledger = ShardLedger(30, 3, 1, lease_timeout_s=5.0)
    old = ledger.lease("w-a", 1, now=0.0)
    old_id = old.lease_id
    ledger.requeue("w-a")
    new = ledger.lease("w-a", 1, now=1.0)  # the same member and shard, a new lease
    assert new.shard.index == old.shard.index and new.lease_id != old_id
    with pytest.raises(FailedPrecondition, match="revoked"):
        ledger.progress("w-a", 1, 0, new.shard.index, 5, now=2.0, lease_id=old_id)
    with pytest.raises(FailedPrecondition, match="revoked"):
        ledger.complete("w-a", 1, 0, new.shard.index, lease_id=old_id)
    assert new.offset == 0 and ledger.done_in_epoch == 0
    assert ledger.progress("w-a", 1, 0, new.shard.index, 5, now=2.0, lease_id=new.lease_id) == 5
    assert ledger.progress("w-a", 1, 0, new.shard.index, 6, now=2.0) == 1  # 0: unspecified, accepted


def test_a_restored_ledger_keeps_lease_ids_and_gives_fresh_deadlines():
    ledger = ShardLedger(30, 3, 1, lease_timeout_s=5.0)
    a = ledger.lease("w-a", 1, now=0.0)
    state = ledger.to_state()
    restored = ShardLedger(30, 3, 1, lease_timeout_s=5.0)
    restored.restore(state, [], now=100.0)
    (lease,) = [restored.lease_of("w-a")]
    assert (lease.lease_id, lease.deadline) == (a.lease_id, 105.0)
    assert restored.lease("w-b", 1, now=100.0).lease_id == a.lease_id + 1  # ids are never reused


# --- the job -------------------------------------------------------------------------------------


def training_job(clock: FakeClock, store=None) -> tuple[Job, object]:
    job = Job(SPEC, 30, INITIAL, events=EventLog(wall_clock=lambda: 0.0), store=store, now=clock.now())
    ps = job.register(Role.PARAMETER_SERVER, "10.0.0.1:7000", clock.now())
    job.ready(ps.member_id, ps.incarnation, job.layout_version, clock.now())
    return job, ps


def beat_server(job: Job, ps, clock: FakeClock) -> None:
    reply = job.heartbeat(ps.member_id, ps.incarnation, clock.now())
    job.heartbeat(ps.member_id, ps.incarnation, clock.now(), roster_version=reply.roster_version)


def test_a_lease_not_renewed_in_time_is_revoked_and_its_holder_fenced_before_the_shard_moves():
    clock = FakeClock()
    job, ps = training_job(clock)
    holder = job.register(Role.WORKER, "", clock.now())
    other = job.register(Role.WORKER, "", clock.now())
    lease = job.lease(holder.member_id, holder.incarnation, clock.now()).lease
    job.lease(other.member_id, other.incarnation, clock.now())

    # Progress and heartbeats renew: 3 s pass (beyond the 2 s lease) and nothing expires.
    for _ in range(6):
        clock.advance(0.5)
        job.progress(holder.member_id, holder.incarnation, 0, lease.shard.index, 1, 0.5, 1, clock.now(),
                     lease_id=lease.lease_id)
        job.heartbeat(other.member_id, other.incarnation, clock.now())
        beat_server(job, ps, clock)
        assert job.tick(clock.now()) == []

    # The holder goes quiet (its heartbeats would still be within the 6 s timeout).
    clock.advance(SPEC.lease_timeout_s + 0.1)
    job.heartbeat(other.member_id, other.incarnation, clock.now())
    beat_server(job, ps, clock)
    dead = job.tick(clock.now())
    assert [m.member_id for m in dead] == [holder.member_id]
    status = job.status(clock.now())
    assert (status.leases_expired, status.members_declared_dead, status.reassignments) == (1, 1, 1)
    (died,) = [e for e in job.events.after(0) if e.kind is EventKind.MEMBER_DECLARED_DEAD]
    assert "without renewing its lease" in died.message

    # Fenced: its reports are refused and change nothing.
    with pytest.raises(Fenced):
        job.progress(holder.member_id, holder.incarnation, 0, lease.shard.index, 9, 0.5, 8, clock.now(),
                     lease_id=lease.lease_id)
    with pytest.raises(Fenced):
        job.heartbeat(holder.member_id, holder.incarnation, clock.now())
    # The shard moves on only after the server acknowledges the revocation.
    newcomer = job.register(Role.WORKER, "", clock.now())
    assert job.lease(newcomer.member_id, newcomer.incarnation, clock.now()).outcome is LeaseOutcome.WAIT
    beat_server(job, ps, clock)
    again = job.lease(newcomer.member_id, newcomer.incarnation, clock.now()).lease
    assert (again.shard.index, again.offset) == (lease.shard.index, 1) and again.lease_id > lease.lease_id


def test_heartbeats_alone_keep_a_lease():
    clock = FakeClock()
    job, ps = training_job(clock)
    w = job.register(Role.WORKER, "", clock.now())
    job.lease(w.member_id, w.incarnation, clock.now())
    for _ in range(20):  # 10 s, five lease timeouts
        clock.advance(0.5)
        job.heartbeat(w.member_id, w.incarnation, clock.now())
        beat_server(job, ps, clock)
        assert job.tick(clock.now()) == []
    assert job.status(clock.now()).leases_expired == 0


def test_a_restarted_coordinator_honours_restored_leases_for_a_fresh_timeout(tmp_path):
    clock = FakeClock()
    store = SqliteJobStore(tmp_path)
    job, ps = training_job(clock, store)
    w = job.register(Role.WORKER, "", clock.now())
    lease = job.lease(w.member_id, w.incarnation, clock.now()).lease
    store.close()

    clock.advance(60.0)  # down for a minute: far beyond the lease timeout
    store = SqliteJobStore(tmp_path)
    restored = Job(SPEC, 30, INITIAL, events=EventLog(wall_clock=lambda: 0.0), store=store, now=clock.now())
    clock.advance(SPEC.lease_timeout_s - 0.1)
    assert restored.tick(clock.now()) == []
    restored.progress(w.member_id, w.incarnation, 0, lease.shard.index, 3, 0.5, 3, clock.now(),
                      lease_id=lease.lease_id)  # the same lease id is still honoured
    assert restored.status(clock.now()).samples_trained == 3
    store.close()


def test_a_lease_timeout_must_exceed_two_heartbeat_intervals():
    with pytest.raises(ConfigError, match="lease_timeout_s"):
        JobSpec(heartbeat_interval_s=1.0, lease_timeout_s=2.0)


# --- the worker's clock --------------------------------------------------------------------------


def test_the_worker_stops_before_the_coordinators_deadline_counting_from_its_last_send():
    clock = FakeClock(start=0.0)
    lease = LeaseClock(clock.now)
    assert lease.may_work() and lease.remaining_s() is None  # no lease: nothing to stop
    lease.grant(sent_at=0.0, timeout_s=10.0)
    clock.advance(7.9)
    assert lease.may_work()
    clock.advance(0.2)  # 8.1 s after the grant was sent: 10 x (1 - margin) has passed
    assert not lease.may_work()
    # The coordinator received the grant at t >= 0 so its deadline is >= 10: the worker stopped first.
    assert 10.0 * (1 - MARGIN_FRACTION) < 10.0
    lease.renewed(sent_at=5.0)  # a heartbeat sent at 5 s succeeded
    assert lease.may_work() and lease.remaining_s() == pytest.approx(5.0 + 8.0 - 8.1)
    lease.renewed(sent_at=1.0)  # an older renewal answering late changes nothing
    assert lease.remaining_s() == pytest.approx(4.9)
    lease.release()
    assert lease.remaining_s() is None
