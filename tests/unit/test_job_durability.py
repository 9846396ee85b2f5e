"""The coordinator's job survives its own restart: same ledger, members and counts, and still no
double counting. Drives Job with a SQLite store in a temp dir and a fake clock."""

from __future__ import annotations

import pytest
import torch

from coordinator.events import EventKind
from coordinator.job import Job, JobState, LeaseOutcome
from coordinator.membership import Role
from coordinator.statedb import SqliteJobStore
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import ConfigError, DuplicateCompletion, Fenced

SPEC = JobSpec(epochs=2, shards_per_epoch=3, parameter_servers=1, heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0)
PARAMS = {"w": torch.ones(3, 2), "b": torch.zeros(2)}


def open_job(state_dir, clock, spec=SPEC) -> Job:
    return Job(spec, 30, PARAMS, store=SqliteJobStore(state_dir), now=clock.now())


def start(job: Job, clock: FakeClock):
    ps = job.register(Role.PARAMETER_SERVER, "127.0.0.1:1", clock.now())
    job.ready(ps.member_id, ps.incarnation, job.layout_version, clock.now())
    return ps


def test_a_restarted_coordinator_resumes_leases_offsets_members_and_counts(tmp_path):
    clock = FakeClock()
    job = open_job(tmp_path, clock)
    ps = start(job, clock)
    w1 = job.register(Role.WORKER, "", clock.now())
    w2 = job.register(Role.WORKER, "", clock.now())
    first = job.lease(w1.member_id, 1, clock.now()).lease
    job.complete(w1.member_id, 1, first.epoch, first.shard.index, 0.5, 10, clock.now())
    second = job.lease(w1.member_id, 1, clock.now()).lease
    job.progress(w1.member_id, 1, second.epoch, second.shard.index, 4, 0.4, 4, clock.now())
    third = job.lease(w2.member_id, 1, clock.now()).lease
    before = job.status(clock.now())

    clock.advance(30.0)  # the coordinator was down for a while; its monotonic clock is new
    again = open_job(tmp_path, clock)

    after = again.status(clock.now())
    assert again.restored and after.state is JobState.TRAINING
    assert after.shard_completions == before.shard_completions == 1
    assert after.samples_trained == before.samples_trained
    assert {m.member.member_id: m.member.incarnation for m in after.members} == {
        ps.member_id: 1, w1.member_id: 1, w2.member_id: 1
    }
    held = {m.member.member_id: m.lease for m in after.members if m.lease}
    assert held[w1.member_id].shard.index == second.shard.index and held[w1.member_id].offset == 4
    assert held[w2.member_id].shard.index == third.shard.index
    # members reattach by heartbeat and get a full timeout from the restart
    again.heartbeat(w1.member_id, 1, clock.now())
    assert again.tick(clock.now() + SPEC.heartbeat_timeout_s - 0.1) == []
    # a completion that landed before the crash cannot be counted again
    with pytest.raises(DuplicateCompletion):
        again.complete(w1.member_id, 1, first.epoch, first.shard.index, 0.5, 10, clock.now())
    assert again.status(clock.now()).duplicate_completions_rejected == 1


def test_fencing_survives_a_restart(tmp_path):
    clock = FakeClock()
    job = open_job(tmp_path, clock)
    start(job, clock)
    w = job.register(Role.WORKER, "", clock.now())
    job.register(Role.WORKER, "", clock.now(), member_id=w.member_id)  # incarnation 2 fences 1
    again = open_job(tmp_path, clock)
    with pytest.raises(Fenced):
        again.heartbeat(w.member_id, 1, clock.now())
    again.heartbeat(w.member_id, 2, clock.now())


def test_a_job_completes_exactly_once_across_several_restarts(tmp_path):
    clock = FakeClock()
    job = open_job(tmp_path, clock)
    ps = start(job, clock)
    w = job.register(Role.WORKER, "", clock.now())
    restarts = 0
    while True:
        decision = job.lease(w.member_id, 1, clock.now())
        if decision.outcome is not LeaseOutcome.GRANTED:
            break
        lease = decision.lease
        job.complete(w.member_id, 1, lease.epoch, lease.shard.index, 0.1, lease.shard.size, clock.now())
        job = open_job(tmp_path, clock)  # restart after every completion
        restarts += 1
    assert decision.outcome is LeaseOutcome.EVALUATE
    status = job.status(clock.now())
    assert restarts == SPEC.epochs * SPEC.shards_per_epoch
    assert status.shard_completions == SPEC.epochs * SPEC.shards_per_epoch
    assert sorted((e, s) for e, s, _, _ in job.completions()) == [(e, s) for e in range(2) for s in range(3)]
    assert status.samples_trained == SPEC.epochs * 30
    assert job.heartbeat(ps.member_id, 1, clock.now()).state is JobState.EVALUATING


def test_event_sequence_keeps_increasing_across_a_restart(tmp_path):
    clock = FakeClock()
    job = open_job(tmp_path, clock)
    start(job, clock)
    last = job.events.after(0)[-1].sequence
    again = open_job(tmp_path, clock)
    assert again.events.after(last)[0].sequence == last + 1
    assert again.events.after(last)[0].kind is EventKind.JOB_STATE_CHANGED


def test_a_state_directory_of_another_job_is_refused(tmp_path):
    clock = FakeClock()
    open_job(tmp_path, clock)
    with pytest.raises(ConfigError, match="different job"):
        open_job(tmp_path, clock, SPEC.replace(epochs=7))


def test_members_that_do_not_reattach_after_a_restart_are_declared_dead(tmp_path):
    clock = FakeClock()
    job = open_job(tmp_path, clock)
    start(job, clock)
    w = job.register(Role.WORKER, "", clock.now())
    job.lease(w.member_id, 1, clock.now())
    again = open_job(tmp_path, clock)
    grace = 2 * SPEC.heartbeat_timeout_s  # reconnect backoff may delay the first heartbeat
    assert again.tick(clock.now() + grace - 0.1) == []
    dead = again.tick(clock.now() + grace + 0.1)
    assert {m.member_id for m in dead} == {w.member_id, "ps-0"}
    assert again.status(clock.now()).reassignments == 1
    assert again.status(clock.now()).shards_pending == SPEC.shards_per_epoch


def test_events_committed_before_a_crash_are_readable_after_the_restart(tmp_path):
    """A watcher that lost its stream when the coordinator was SIGKILLed resumes from the last
    sequence it saw; completions committed (and published) but not yet delivered are still there,
    with the same sequence numbers, and new events continue the numbering."""
    clock = FakeClock()
    job = open_job(tmp_path, clock)
    start(job, clock)
    w = job.register(Role.WORKER, "", clock.now())
    lease = job.lease(w.member_id, 1, clock.now()).lease
    seen = job.events.after(0)[-1].sequence  # the watcher got this far
    job.complete(w.member_id, 1, lease.epoch, lease.shard.index, 0.5, 10, clock.now())
    undelivered = job.events.after(seen)
    assert [e.kind for e in undelivered if e.kind is EventKind.SHARD_COMPLETED]

    again = open_job(tmp_path, clock)  # the old process is gone without another word

    resumed = again.events.after(seen)
    assert resumed[: len(undelivered)] == undelivered
    assert resumed[len(undelivered)].kind is EventKind.JOB_STATE_CHANGED  # "coordinator restarted"
    assert [e.sequence for e in resumed] == list(range(seen + 1, seen + 1 + len(resumed)))
    assert [e.sequence for e in again.events.after(0)] == list(range(1, resumed[-1].sequence + 1))
    # and that restart notice is itself durable
    third = open_job(tmp_path, clock)
    assert third.events.after(0)[: len(again.events.after(0))] == again.events.after(0)


def test_the_store_keeps_only_the_newest_events(tmp_path):
    from coordinator.events import EVENT_RETENTION

    store = SqliteJobStore(tmp_path)
    bodies = [{"sequence": n, "kind": "EPOCH_STARTED"} for n in range(1, EVENT_RETENTION + 6)]
    store.save({"job": {}}, (), bodies[:10])
    store.save({"job": {}}, (), bodies[10:])
    kept = store.load().events
    assert len(kept) == EVENT_RETENTION
    assert kept[0]["sequence"] == 6 and kept[-1]["sequence"] == EVENT_RETENTION + 5
    store.close()
