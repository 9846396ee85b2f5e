"""What the coordinator tells clients is true: event incarnations and offsets, members that exited
after the job are not alive, instances, reports without a loss, and declining the evaluation."""

from __future__ import annotations

import math

import pytest

from coordinator.events import EventKind
from coordinator.job import Job, JobState, LeaseOutcome
from coordinator.membership import Role
from lepton.clock import FakeClock
from lepton.domain import CheckpointReport
from lepton.errors import FailedPrecondition, InvalidArgument
from unit.test_job import INITIAL, RESULT, SAMPLES, SPEC, beat, kinds, start_training, worker


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def job() -> Job:
    from coordinator.events import EventLog

    return Job(SPEC, SAMPLES, INITIAL, events=EventLog(wall_clock=lambda: 0.0))


def finish_epochs(job: Job, clock: FakeClock, w, loss: float | None = 1.0) -> None:
    while job.state is JobState.TRAINING:
        lease = job.lease(w.member_id, w.incarnation, clock.now()).lease
        job.complete(w.member_id, w.incarnation, lease.epoch, lease.shard.index, loss, lease.shard.size, clock.now())


def test_shard_completed_events_carry_the_shards_size_and_the_incarnation(job, clock):
    start_training(job, clock)
    w = worker(job, clock)
    w = job.register(Role.WORKER, "", clock.now(), member_id=w.member_id)  # incarnation 2
    lease = job.lease(w.member_id, w.incarnation, clock.now()).lease
    job.complete(w.member_id, w.incarnation, lease.epoch, lease.shard.index, 0.5, lease.shard.size, clock.now())
    (event,) = kinds(job, EventKind.SHARD_COMPLETED)
    assert event.offset == lease.shard.size == 10
    assert (event.member_id, event.incarnation, event.loss) == (w.member_id, 2, 0.5)


def test_checkpoint_events_carry_the_reporting_servers_incarnation(job, clock):
    servers = start_training(job, clock)
    ps = job.register(Role.PARAMETER_SERVER, "10.0.0.9:7000", clock.now(), member_id=servers[0].member_id)
    job.ready(ps.member_id, ps.incarnation, job.layout_version, clock.now())
    checkpoint, _ = job.request_checkpoint("", clock.now())
    failed = CheckpointReport(checkpoint.checkpoint_id, checkpoint.target_version, 0, error="disk full")
    job.heartbeat(ps.member_id, ps.incarnation, clock.now(), checkpoint=failed)
    (event,) = kinds(job, EventKind.CHECKPOINT_FAILED)
    assert (event.member_id, event.incarnation) == (ps.member_id, 2)


def test_members_silent_after_the_job_ended_are_not_alive(job, clock):
    servers = start_training(job, clock)
    w = worker(job, clock)
    finish_epochs(job, clock, w)
    assert job.lease(w.member_id, w.incarnation, clock.now()).outcome is LeaseOutcome.EVALUATE
    job.report_evaluation(w.member_id, w.incarnation, RESULT, clock.now())
    assert job.state is JobState.SUCCEEDED
    alive = {s.member.member_id: s.alive for s in job.status(clock.now()).members}
    assert all(alive.values())
    clock.advance(SPEC.heartbeat_timeout_s / 2)
    beat(job, clock, servers[:1])  # one server still runs; everyone else has exited
    clock.advance(SPEC.heartbeat_timeout_s / 2 + 0.1)
    assert job.tick(clock.now()) == []  # nobody is declared dead after the job...
    alive = {s.member.member_id: s.alive for s in job.status(clock.now()).members}
    assert alive == {servers[0].member_id: True, servers[1].member_id: False, w.member_id: False}  # ...but shown gone


def test_a_silent_member_while_the_job_runs_stays_alive_until_declared_dead(job, clock):
    start_training(job, clock)
    w = worker(job, clock)
    clock.advance(SPEC.heartbeat_timeout_s - 0.1)
    assert {s.member.member_id: s.alive for s in job.status(clock.now()).members}[w.member_id] is True


def test_the_instance_a_member_reports_is_kept_and_bounded(job, clock):
    member = job.register(Role.WORKER, "", clock.now(), hostname="host", pid=1, instance="lepton-worker-7f9c")
    (snap,) = job.status(clock.now()).members
    assert (snap.member.pid, snap.member.instance) == (1, "lepton-worker-7f9c")
    with pytest.raises(InvalidArgument):
        job.register(Role.WORKER, "", clock.now(), instance="x" * 254)
    assert member.instance == "lepton-worker-7f9c"


def test_reports_without_a_loss_count_their_samples_but_leave_recent_loss_alone(job, clock):
    start_training(job, clock)
    w = worker(job, clock)
    lease = job.lease(w.member_id, w.incarnation, clock.now()).lease
    job.progress(w.member_id, w.incarnation, lease.epoch, lease.shard.index, 4, None, 4, clock.now())
    status = job.status(clock.now())
    assert status.samples_trained == 4 and math.isnan(status.recent_loss)
    job.progress(w.member_id, w.incarnation, lease.epoch, lease.shard.index, 6, 2.0, 2, clock.now())
    job.complete(w.member_id, w.incarnation, lease.epoch, lease.shard.index, None, 4, clock.now())
    status = job.status(clock.now())
    assert status.samples_trained == 10 and status.recent_loss == 2.0
    (event,) = kinds(job, EventKind.SHARD_COMPLETED)
    assert event.loss == 0.0


def test_a_declined_evaluation_goes_to_another_worker(job, clock):
    start_training(job, clock)
    first, second = worker(job, clock), worker(job, clock)
    finish_epochs(job, clock, first)
    assert job.lease(first.member_id, first.incarnation, clock.now()).outcome is LeaseOutcome.EVALUATE
    with pytest.raises(FailedPrecondition):
        job.decline_evaluation(second.member_id, second.incarnation, "", clock.now())
    with pytest.raises(InvalidArgument):
        job.decline_evaluation(first.member_id, first.incarnation, "x" * 2001, clock.now())
    job.decline_evaluation(first.member_id, first.incarnation, "no test set here", clock.now())
    with pytest.raises(FailedPrecondition):  # a retry of a decline that took effect
        job.decline_evaluation(first.member_id, first.incarnation, "", clock.now())
    assert job.lease(first.member_id, first.incarnation, clock.now()).outcome is LeaseOutcome.WAIT
    assert job.lease(second.member_id, second.incarnation, clock.now()).outcome is LeaseOutcome.EVALUATE
    assert job.lease(first.member_id, first.incarnation, clock.now()).outcome is LeaseOutcome.WAIT
    (event,) = kinds(job, EventKind.EVALUATION_DECLINED)
    assert (event.member_id, event.incarnation) == (first.member_id, first.incarnation)
    assert "no test set here" in event.message
    job.report_evaluation(second.member_id, second.incarnation, RESULT, clock.now())
    assert job.state is JobState.SUCCEEDED
