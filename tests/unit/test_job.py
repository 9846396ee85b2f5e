"""The coordinator's Job driven directly with a fake clock: lifecycle, failures, status, events."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.events import EventKind, EventLog
from coordinator.job import EvaluationResult, Job, JobState, LeaseOutcome
from coordinator.membership import Member, Role
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import DuplicateCompletion, FailedPrecondition, Fenced, InvalidArgument, NotFound, NotReady
from lepton.tensors import assemble

SPEC = JobSpec(
    epochs=2,
    shards_per_epoch=3,
    parameter_servers=2,
    heartbeat_interval_s=0.5,
    heartbeat_timeout_s=3.0,
)
SAMPLES = 30  # three shards of 10
INITIAL = {
    "net.0.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3),
    "net.0.bias": torch.zeros(3),
    "net.1.weight": torch.ones(3, 2, dtype=torch.float64),
}
RESULT = EvaluationResult(
    accuracy=0.9, macro_recall=0.8, loss=0.3, samples=50, inference_samples_per_second=100.0
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def job() -> Job:
    return Job(SPEC, SAMPLES, INITIAL, events=EventLog(wall_clock=lambda: 0.0))


def kinds(job: Job, kind: EventKind) -> list:
    return [e for e in job.events.after(0) if e.kind is kind]


def register_servers(job: Job, clock: FakeClock) -> list[Member]:
    return [job.register(Role.PARAMETER_SERVER, f"10.0.0.{i}:7000", clock.now()) for i in range(2)]


def start_training(job: Job, clock: FakeClock) -> list[Member]:
    servers = register_servers(job, clock)
    for ps in servers:
        job.ready(ps.member_id, ps.incarnation, job.layout_version, clock.now())
    assert job.state is JobState.TRAINING
    return servers


def beat(job: Job, clock: FakeClock, members: list[Member]) -> None:
    """Each member heartbeats; a server also acknowledges the roster it was just sent."""
    for m in members:
        reply = job.heartbeat(m.member_id, m.incarnation, clock.now())
        if m.role is Role.PARAMETER_SERVER:
            job.heartbeat(m.member_id, m.incarnation, clock.now(), roster_version=reply.roster_version)


def worker(job: Job, clock: FakeClock, member_id: str = "") -> Member:
    return job.register(Role.WORKER, "", clock.now(), member_id=member_id)


def train_shard(job: Job, clock: FakeClock, w: Member, loss: float = 1.0) -> bool:
    decision = job.lease(w.member_id, w.incarnation, clock.now())
    assert decision.outcome is LeaseOutcome.GRANTED
    lease = decision.lease
    return job.complete(
        w.member_id,
        w.incarnation,
        lease.epoch,
        lease.shard.index,
        loss,
        lease.shard.size - lease.offset,
        clock.now(),
    )


# --- the whole lifecycle -----------------------------------------------------------------------


def test_a_job_runs_from_waiting_for_servers_to_succeeded(job, clock):
    assert job.state is JobState.WAITING_FOR_SERVERS
    w = worker(job, clock)
    wait = job.lease(w.member_id, w.incarnation, clock.now())
    assert wait.outcome is LeaseOutcome.WAIT and wait.retry_after_s == SPEC.heartbeat_interval_s / 2
    with pytest.raises(NotReady) as not_ready:
        job.layout()
    assert not_ready.value.retry_after_s == SPEC.heartbeat_interval_s / 2

    ps0 = job.register(Role.PARAMETER_SERVER, "10.0.0.1:7000", clock.now())
    assert job.state is JobState.WAITING_FOR_SERVERS and job.layout_version == 0
    with pytest.raises(NotReady):
        job.assignment(ps0.member_id, ps0.incarnation)
    ps1 = job.register(Role.PARAMETER_SERVER, "10.0.0.2:7000", clock.now())
    assert job.state is JobState.INITIALIZING and job.layout_version == 1

    layout, addresses = job.layout()
    assert addresses == {ps0.member_id: "10.0.0.1:7000", ps1.member_id: "10.0.0.2:7000"}
    assigned, specs = {}, []
    for ps in (ps0, ps1):
        a = job.assignment(ps.member_id, ps.incarnation)
        assert a.layout_version == 1
        assert list(a.tensors) == list(layout.tensors_of(ps.member_id))
        assert abs(layout.bytes_of(ps0.member_id) - layout.bytes_of(ps1.member_id)) <= 4 * 4  # one row
        assigned.update(a.values)
        specs += a.tensors
    assigned = assemble(specs, assigned)  # the slices put back together are the initial values
    assert sorted(assigned) == sorted(INITIAL)
    for name, value in INITIAL.items():
        assert torch.equal(assigned[name], value) and assigned[name].dtype == value.dtype

    assert job.lease(w.member_id, w.incarnation, clock.now()).outcome is LeaseOutcome.WAIT
    job.ready(ps0.member_id, ps0.incarnation, 1, clock.now())
    assert job.state is JobState.INITIALIZING
    job.ready(ps1.member_id, ps1.incarnation, 1, clock.now())
    assert job.state is JobState.TRAINING

    train_start = clock.now()
    epoch_ends = []
    for _ in range(2 * 3):
        clock.advance(1.0)
        epoch_ends.append(train_shard(job, clock, w, loss=0.5))
    assert epoch_ends == [False, False, True, False, False, True]
    assert job.state is JobState.EVALUATING
    train_seconds = clock.now() - train_start

    other = worker(job, clock)
    assert job.lease(w.member_id, w.incarnation, clock.now()).outcome is LeaseOutcome.EVALUATE
    assert job.lease(other.member_id, other.incarnation, clock.now()).outcome is LeaseOutcome.WAIT
    assert job.lease(w.member_id, w.incarnation, clock.now()).outcome is LeaseOutcome.EVALUATE  # retry
    with pytest.raises(FailedPrecondition):
        job.report_evaluation(other.member_id, other.incarnation, RESULT, clock.now())

    clock.advance(5.0)
    job.report_evaluation(w.member_id, w.incarnation, RESULT, clock.now())
    assert job.state is JobState.SUCCEEDED
    for m in (w, other):
        assert job.lease(m.member_id, m.incarnation, clock.now()).outcome is LeaseOutcome.JOB_DONE

    status = job.status(clock.now())
    assert status.state is JobState.SUCCEEDED
    assert status.evaluation == RESULT
    assert status.shard_completions == 6
    assert status.samples_trained == 60
    assert status.epoch == 1
    assert status.training_seconds == pytest.approx(train_seconds)  # ends at EVALUATING
    assert status.samples_per_second == pytest.approx(60 / train_seconds)
    assert status.recent_loss == pytest.approx(0.5)
    assert status.duplicate_completions_rejected == 0
    assert (status.reassignments, status.members_declared_dead) == (0, 0)
    assert status.failure == ""
    assert [(e, s, m) for e, s, m, _ in job.completions()] == [
        (0, 0, w.member_id), (0, 1, w.member_id), (0, 2, w.member_id),
        (1, 0, w.member_id), (1, 1, w.member_id), (1, 2, w.member_id),
    ]

    assert [e.job_state for e in kinds(job, EventKind.JOB_STATE_CHANGED)] == [
        "INITIALIZING", "TRAINING", "EVALUATING", "SUCCEEDED"
    ]
    assert [e.epoch for e in kinds(job, EventKind.EPOCH_STARTED)] == [0, 1]
    assert len(kinds(job, EventKind.MEMBER_REGISTERED)) == 4
    assert len(kinds(job, EventKind.SHARD_LEASED)) == 6
    assert [(e.epoch, e.shard) for e in kinds(job, EventKind.SHARD_COMPLETED)] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)
    ]
    assert len(kinds(job, EventKind.EVALUATED)) == 1
    sequences = [e.sequence for e in job.events.after(0)]
    assert sequences == list(range(1, len(sequences) + 1))


def test_a_third_parameter_server_is_refused(job, clock):
    register_servers(job, clock)
    with pytest.raises(FailedPrecondition):
        job.register(Role.PARAMETER_SERVER, "10.0.0.9:7000", clock.now())
    assert len(kinds(job, EventKind.MEMBER_REGISTERED)) == 2


def test_a_parameter_server_must_give_a_dialable_address(job, clock):
    for address in ("", "no-port"):
        with pytest.raises(InvalidArgument):
            job.register(Role.PARAMETER_SERVER, address, clock.now())
    assert job.state is JobState.WAITING_FOR_SERVERS


def test_ready_with_a_stale_layout_version_is_refused(job, clock):
    ps0, ps1 = register_servers(job, clock)
    with pytest.raises(FailedPrecondition):
        job.ready(ps0.member_id, ps0.incarnation, 2, clock.now())
    with pytest.raises(FailedPrecondition):
        job.ready(ps0.member_id, ps0.incarnation, 0, clock.now())
    assert job.state is JobState.INITIALIZING


def test_a_worker_cannot_call_parameter_server_methods_nor_the_reverse(job, clock):
    ps0, _ = start_training(job, clock)
    w = worker(job, clock)
    with pytest.raises(FailedPrecondition):
        job.assignment(w.member_id, w.incarnation)
    with pytest.raises(FailedPrecondition):
        job.ready(w.member_id, w.incarnation, 1, clock.now())
    with pytest.raises(FailedPrecondition):
        job.lease(ps0.member_id, ps0.incarnation, clock.now())


def test_an_unregistered_member_is_not_found(job, clock):
    start_training(job, clock)
    with pytest.raises(NotFound):
        job.lease("worker-9", 1, clock.now())
    with pytest.raises(NotFound):
        job.heartbeat("worker-9", 1, clock.now())


def test_the_evaluation_must_lie_in_range(job, clock):
    start_training(job, clock)
    w = worker(job, clock)
    for _ in range(6):
        train_shard(job, clock, w)
    assert job.lease(w.member_id, w.incarnation, clock.now()).outcome is LeaseOutcome.EVALUATE
    good = dict(accuracy=0.5, macro_recall=0.5, loss=0.1, samples=1, inference_samples_per_second=1.0)
    for field, value in [
        ("accuracy", 1.5), ("accuracy", float("nan")), ("loss", float("nan")), ("loss", float("inf")),
        ("samples", -1), ("inference_samples_per_second", float("inf")), ("inference_samples_per_second", -1.0),
    ]:
        with pytest.raises(InvalidArgument):
            job.report_evaluation(w.member_id, w.incarnation, EvaluationResult(**{**good, field: value}), clock.now())
    assert job.state is JobState.EVALUATING and job.status(clock.now()).evaluation is None


def test_heartbeats_and_registrations_with_negative_numbers_are_refused(job, clock):
    ps0, _ = start_training(job, clock)
    with pytest.raises(InvalidArgument, match="version and roster_version must be >= 0"):
        job.heartbeat(ps0.member_id, ps0.incarnation, clock.now(), version=-1)
    with pytest.raises(InvalidArgument, match="pid must be >= 0"):
        job.register(Role.WORKER, "", clock.now(), pid=-5)


def test_report_evaluation_before_evaluating_is_refused(job, clock):
    start_training(job, clock)
    w = worker(job, clock)
    with pytest.raises(FailedPrecondition):
        job.report_evaluation(w.member_id, w.incarnation, RESULT, clock.now())
    assert job.state is JobState.TRAINING


# --- worker failure ----------------------------------------------------------------------------


def test_lease_returns_to_queue_when_worker_misses_heartbeats(job, clock):
    servers = start_training(job, clock)
    doomed = worker(job, clock)
    survivor = worker(job, clock)
    lease = job.lease(doomed.member_id, doomed.incarnation, clock.now()).lease
    assert lease.shard.index == 0
    clock.advance(1.0)
    job.progress(doomed.member_id, doomed.incarnation, 0, 0, 4, loss=2.0, samples=4, now=clock.now())
    last_word = clock.now()

    clock.advance(SPEC.heartbeat_timeout_s)  # exactly at the timeout: still alive
    beat(job, clock, [*servers, survivor])
    assert job.tick(clock.now()) == []
    clock.advance(0.01)
    beat(job, clock, [*servers, survivor])
    dead = job.tick(clock.now())
    assert [(m.member_id, m.incarnation) for m in dead] == [(doomed.member_id, 1)]
    assert clock.now() - last_word > SPEC.heartbeat_timeout_s

    status = job.status(clock.now())
    assert (status.reassignments, status.members_declared_dead) == (1, 1)
    assert (status.shards_pending, status.shards_leased) == (3, 0)
    assert status.samples_trained == 4
    assert job.state is JobState.TRAINING

    (died,) = kinds(job, EventKind.MEMBER_DECLARED_DEAD)
    assert (died.member_id, died.incarnation) == (doomed.member_id, 1)
    (requeued,) = kinds(job, EventKind.SHARD_REQUEUED)
    assert (requeued.member_id, requeued.epoch) == (doomed.member_id, 0)
    assert (requeued.shard, requeued.offset) == (0, 4)

    # The dead worker's shard moves on only once every server has acknowledged its fencing.
    assert job.lease(survivor.member_id, survivor.incarnation, clock.now()).outcome is LeaseOutcome.WAIT
    beat(job, clock, servers)
    again = job.lease(survivor.member_id, survivor.incarnation, clock.now())
    assert (again.lease.shard.index, again.lease.offset) == (0, 4)

    with pytest.raises(Fenced):
        job.progress(doomed.member_id, doomed.incarnation, 0, 0, 8, loss=1.0, samples=4, now=clock.now())
    with pytest.raises(Fenced):
        job.complete(doomed.member_id, doomed.incarnation, 0, 0, loss=1.0, samples=6, now=clock.now())
    with pytest.raises(Fenced):
        job.heartbeat(doomed.member_id, doomed.incarnation, clock.now())
    with pytest.raises(Fenced):
        job.lease(doomed.member_id, doomed.incarnation, clock.now())
    assert job.status(clock.now()).shard_completions == 0

    assert job.complete(survivor.member_id, survivor.incarnation, 0, 0, 1.0, 6, clock.now()) is False
    assert job.status(clock.now()).samples_trained == 10
    assert job.tick(clock.now()) == []  # declared dead once


def test_progress_proves_life_as_well_as_a_heartbeat(job, clock):
    servers = start_training(job, clock)
    w = worker(job, clock)
    job.lease(w.member_id, w.incarnation, clock.now())
    for offset in range(1, 6):
        clock.advance(SPEC.heartbeat_timeout_s * 0.9)
        beat(job, clock, servers)
        job.progress(w.member_id, w.incarnation, 0, 0, offset, loss=1.0, samples=1, now=clock.now())
        assert job.tick(clock.now()) == []


def test_a_dead_worker_that_re_registers_gets_a_new_incarnation_and_can_lease(job, clock):
    servers = start_training(job, clock)
    w = worker(job, clock)
    job.lease(w.member_id, w.incarnation, clock.now())
    clock.advance(SPEC.heartbeat_timeout_s + 1)
    beat(job, clock, servers)
    assert len(job.tick(clock.now())) == 1
    back = worker(job, clock, member_id=w.member_id)
    assert back.incarnation == 2
    beat(job, clock, servers)
    lease = job.lease(back.member_id, back.incarnation, clock.now()).lease
    assert (lease.shard.index, lease.incarnation) == (0, 2)


def test_re_registering_a_worker_requeues_the_old_incarnations_lease(job, clock):
    servers = start_training(job, clock)
    w = worker(job, clock)
    job.lease(w.member_id, w.incarnation, clock.now())
    job.progress(w.member_id, 1, 0, 0, 3, loss=1.0, samples=3, now=clock.now())
    back = worker(job, clock, member_id=w.member_id)
    status = job.status(clock.now())
    assert status.reassignments == 1 and status.shards_leased == 0
    beat(job, clock, servers)  # the servers acknowledge that incarnation 1 is fenced
    lease = job.lease(back.member_id, back.incarnation, clock.now()).lease
    assert (lease.shard.index, lease.offset, lease.incarnation) == (0, 3, 2)
    with pytest.raises(Fenced):
        job.progress(w.member_id, 1, 0, 0, 5, loss=1.0, samples=2, now=clock.now())


def test_a_deregistered_workers_shard_is_requeued_immediately(job, clock):
    start_training(job, clock)
    leaving = worker(job, clock)
    other = worker(job, clock)
    job.lease(leaving.member_id, leaving.incarnation, clock.now())
    job.progress(leaving.member_id, 1, 0, 0, 7, loss=1.0, samples=7, now=clock.now())
    assert job.deregister(leaving.member_id, leaving.incarnation, clock.now()) == 1

    status = job.status(clock.now())
    assert (status.reassignments, status.members_declared_dead, status.shards_leased) == (1, 0, 0)
    (departed,) = kinds(job, EventKind.MEMBER_DEPARTED)
    assert departed.member_id == leaving.member_id
    (requeued,) = kinds(job, EventKind.SHARD_REQUEUED)
    assert (requeued.shard, requeued.offset) == (0, 7)

    lease = job.lease(other.member_id, other.incarnation, clock.now()).lease
    assert (lease.shard.index, lease.offset) == (0, 7)
    with pytest.raises(Fenced):
        job.complete(leaving.member_id, leaving.incarnation, 0, 0, 1.0, 3, clock.now())
    with pytest.raises(Fenced):
        job.deregister(leaving.member_id, leaving.incarnation, clock.now())


def test_a_new_evaluator_is_chosen_when_the_first_one_dies(job, clock):
    servers = start_training(job, clock)
    first, second = worker(job, clock), worker(job, clock)
    for _ in range(6):
        train_shard(job, clock, first)
    assert job.lease(first.member_id, 1, clock.now()).outcome is LeaseOutcome.EVALUATE
    assert job.lease(second.member_id, 1, clock.now()).outcome is LeaseOutcome.WAIT
    clock.advance(SPEC.heartbeat_timeout_s + 1)
    beat(job, clock, [*servers, second])
    assert [m.member_id for m in job.tick(clock.now())] == [first.member_id]
    assert job.lease(second.member_id, 1, clock.now()).outcome is LeaseOutcome.EVALUATE
    job.report_evaluation(second.member_id, 1, RESULT, clock.now())
    assert job.state is JobState.SUCCEEDED


def test_an_evaluator_that_re_registers_is_asked_again_and_its_old_incarnation_is_refused(job, clock):
    start_training(job, clock)
    w = worker(job, clock)
    for _ in range(6):
        train_shard(job, clock, w)
    assert job.lease(w.member_id, 1, clock.now()).outcome is LeaseOutcome.EVALUATE
    again = worker(job, clock, member_id=w.member_id)  # a restarted worker under its --id
    assert again.incarnation == 2
    assert job.lease(w.member_id, 2, clock.now()).outcome is LeaseOutcome.EVALUATE
    with pytest.raises(Fenced):
        job.report_evaluation(w.member_id, 1, RESULT, clock.now())
    job.report_evaluation(w.member_id, 2, RESULT, clock.now())
    assert job.state is JobState.SUCCEEDED


@pytest.mark.parametrize("returns", [True, False], ids=["restarts", "never-returns"])
def test_a_parameter_server_lost_while_evaluating_is_waited_for_then_fails_the_job(job, clock, returns):
    """The evaluator keeps its evaluation while a server restarts (it follows the new layout); a
    server that never comes back ends the job FAILED after the recovery timeout, not EVALUATING."""
    ps0, ps1 = start_training(job, clock)
    w = worker(job, clock)
    for _ in range(6):
        train_shard(job, clock, w)
    assert job.lease(w.member_id, 1, clock.now()).outcome is LeaseOutcome.EVALUATE
    clock.advance(SPEC.heartbeat_timeout_s + 1)
    beat(job, clock, [ps0, w])
    assert [m.member_id for m in job.tick(clock.now())] == [ps1.member_id]
    assert job.lease(w.member_id, 1, clock.now()).outcome is LeaseOutcome.EVALUATE
    if returns:
        back = job.register(Role.PARAMETER_SERVER, "10.0.0.9:7000", clock.now(), member_id=ps1.member_id)
        job.ready(back.member_id, back.incarnation, job.layout_version, clock.now())
        job.report_evaluation(w.member_id, 1, RESULT, clock.now())
        assert job.state is JobState.SUCCEEDED
        return
    for _ in range(int(job.ps_recovery_timeout_s // SPEC.heartbeat_interval_s) + 2):
        clock.advance(SPEC.heartbeat_interval_s)
        beat(job, clock, [ps0, w])
        job.tick(clock.now())
    assert job.state is JobState.FAILED and ps1.member_id in job.status(clock.now()).failure


# --- parameter server failure ------------------------------------------------------------------


def test_a_parameter_server_dying_after_the_layout_pauses_leasing_until_it_restarts(job, clock):
    ps0, ps1 = start_training(job, clock)
    w = worker(job, clock)
    held = job.lease(w.member_id, w.incarnation, clock.now()).lease
    job.heartbeat(ps1.member_id, ps1.incarnation, clock.now(), version=5)
    clock.advance(SPEC.heartbeat_timeout_s + 1)
    beat(job, clock, [ps0, w])
    assert [m.member_id for m in job.tick(clock.now())] == [ps1.member_id]
    assert job.state is JobState.TRAINING
    late = worker(job, clock)
    assert job.lease(late.member_id, late.incarnation, clock.now()).outcome is LeaseOutcome.WAIT
    layout_before = job.layout_version

    back = job.register(Role.PARAMETER_SERVER, "10.0.0.5:7000", clock.now(), member_id=ps1.member_id)
    assert back.incarnation == 2 and job.layout_version == layout_before + 1
    assignment = job.assignment(back.member_id, back.incarnation)
    job.ready(back.member_id, back.incarnation, assignment.layout_version, clock.now(), version=3)
    status = job.status(clock.now())
    assert status.ps_restarts == 1 and status.steps_rolled_back == 2
    resumed = job.lease(late.member_id, late.incarnation, clock.now())
    assert resumed.outcome is LeaseOutcome.GRANTED and resumed.lease.shard.index != held.shard.index


def test_a_parameter_server_that_never_returns_fails_the_job_after_the_recovery_timeout(job, clock):
    ps0, ps1 = start_training(job, clock)
    clock.advance(SPEC.heartbeat_timeout_s + 1)
    beat(job, clock, [ps0])
    job.tick(clock.now())
    assert job.state is JobState.TRAINING
    for _ in range(int(job.ps_recovery_timeout_s // SPEC.heartbeat_interval_s) + 2):
        clock.advance(SPEC.heartbeat_interval_s)
        beat(job, clock, [ps0])
        job.tick(clock.now())
    assert job.state is JobState.FAILED
    assert ps1.member_id in job.status(clock.now()).failure
    assert kinds(job, EventKind.JOB_STATE_CHANGED)[-1].job_state == "FAILED"


def test_a_parameter_server_dying_before_the_layout_is_replaced(job, clock):
    ps0 = job.register(Role.PARAMETER_SERVER, "10.0.0.1:7000", clock.now())
    clock.advance(SPEC.heartbeat_timeout_s + 1)
    assert [m.member_id for m in job.tick(clock.now())] == [ps0.member_id]
    assert job.state is JobState.WAITING_FOR_SERVERS
    ps1 = job.register(Role.PARAMETER_SERVER, "10.0.0.2:7000", clock.now())
    assert job.state is JobState.WAITING_FOR_SERVERS
    ps2 = job.register(Role.PARAMETER_SERVER, "10.0.0.3:7000", clock.now())
    assert job.state is JobState.INITIALIZING
    layout, _ = job.layout()
    assert layout.servers == (ps1.member_id, ps2.member_id)


def test_members_leaving_after_success_are_not_declared_dead(job, clock):
    start_training(job, clock)
    w = worker(job, clock)
    for _ in range(6):
        train_shard(job, clock, w)
    job.lease(w.member_id, 1, clock.now())
    job.report_evaluation(w.member_id, 1, RESULT, clock.now())
    clock.advance(SPEC.heartbeat_timeout_s + 1)
    assert job.tick(clock.now()) == []
    status = job.status(clock.now())
    assert job.state is JobState.SUCCEEDED and status.failure == "" and status.members_declared_dead == 0


# --- status, heartbeats, duplicates ------------------------------------------------------------


def test_status_counts_completions_duplicates_and_loss(job, clock):
    start_training(job, clock)
    w = worker(job, clock)
    assert math.isnan(job.status(clock.now()).recent_loss)
    lease = job.lease(w.member_id, 1, clock.now()).lease
    job.progress(w.member_id, 1, 0, lease.shard.index, 4, loss=3.0, samples=4, now=clock.now())
    job.complete(w.member_id, 1, 0, lease.shard.index, loss=1.0, samples=6, now=clock.now())
    with pytest.raises(DuplicateCompletion):
        job.complete(w.member_id, 1, 0, lease.shard.index, loss=1.0, samples=6, now=clock.now())
    job.lease(w.member_id, 1, clock.now())

    status = job.status(clock.now())
    assert status.state is JobState.TRAINING and status.epoch == 0
    assert status.shard_completions == 1
    assert status.duplicate_completions_rejected == 1
    assert (status.shards_completed_in_epoch, status.shards_leased, status.shards_pending) == (1, 1, 1)
    assert status.samples_trained == 10
    assert status.recent_loss == pytest.approx((3.0 * 4 + 1.0 * 6) / 10)
    assert status.layout_version == 1
    (rejected,) = kinds(job, EventKind.DUPLICATE_COMPLETION_REJECTED)
    assert (rejected.member_id, rejected.epoch, rejected.shard) == (w.member_id, 0, lease.shard.index)


def test_status_lists_members_with_heartbeat_age_and_lease(job, clock):
    ps0, ps1 = start_training(job, clock)
    w = worker(job, clock)
    lease = job.lease(w.member_id, 1, clock.now()).lease
    clock.advance(2.0)
    snapshots = {s.member.member_id: s for s in job.status(clock.now()).members}
    assert set(snapshots) == {ps0.member_id, ps1.member_id, w.member_id}
    assert snapshots[w.member_id].heartbeat_age_s == pytest.approx(2.0)
    assert snapshots[w.member_id].lease is lease
    assert snapshots[ps0.member_id].lease is None


def test_training_seconds_count_from_training_start(job, clock):
    register_servers(job, clock)
    assert job.status(clock.now()).training_seconds == 0.0
    clock.advance(10.0)
    for ps in job.layout()[0].servers:
        job.ready(ps, 1, 1, clock.now())
    clock.advance(4.0)
    assert job.status(clock.now()).training_seconds == pytest.approx(4.0)


def test_a_heartbeat_reply_to_a_parameter_server_lists_workers_with_alive_flags(job, clock):
    servers = start_training(job, clock)
    w0, w1, w2 = worker(job, clock), worker(job, clock), worker(job, clock)
    job.deregister(w2.member_id, 1, clock.now())
    clock.advance(SPEC.heartbeat_timeout_s + 1)
    beat(job, clock, [*servers, w1])
    job.tick(clock.now())

    reply = job.heartbeat(servers[0].member_id, 1, clock.now())
    assert reply.state is JobState.TRAINING and reply.layout_version == 1
    assert {(v.member_id, v.incarnation, v.alive) for v in reply.workers} == {
        (w0.member_id, 1, False),
        (w1.member_id, 1, True),
        (w2.member_id, 1, False),
    }
    worker_reply = job.heartbeat(w1.member_id, 1, clock.now())
    assert worker_reply.workers == () and worker_reply.state is JobState.TRAINING


def test_an_idle_worker_waits_when_every_shard_is_leased(job, clock):
    start_training(job, clock)
    workers = [worker(job, clock) for _ in range(4)]
    outcomes = [job.lease(w.member_id, 1, clock.now()).outcome for w in workers]
    assert outcomes == [LeaseOutcome.GRANTED] * 3 + [LeaseOutcome.WAIT]


def test_the_initial_parameters_are_copied_not_shared(clock):
    values = {"w": torch.zeros(2)}
    job = Job(SPEC.replace(parameter_servers=1), SAMPLES, values)
    ps = job.register(Role.PARAMETER_SERVER, "h:1", clock.now())
    values["w"].add_(5)
    assert job.assignment(ps.member_id, 1).values["w"].tolist() == [0.0, 0.0]


# --- regressions found while writing these tests -----------------------------------------


def test_a_worker_registering_under_a_parameter_servers_id_is_refused_without_side_effects(job, clock):
    ps0, _ = start_training(job, clock)
    with pytest.raises(InvalidArgument):
        job.register(Role.WORKER, "", clock.now(), member_id=ps0.member_id)
    assert job.state is JobState.TRAINING
    assert job.status(clock.now()).failure == ""
    job.heartbeat(ps0.member_id, ps0.incarnation, clock.now())


def test_a_failed_job_stays_failed_when_a_late_completion_ends_the_last_epoch(clock):
    job = Job(SPEC.replace(epochs=1, shards_per_epoch=1), SAMPLES, INITIAL)
    ps0, ps1 = start_training(job, clock)
    w = worker(job, clock)
    lease = job.lease(w.member_id, 1, clock.now()).lease
    job.cancel("operator stopped it", clock.now())
    assert job.state is JobState.FAILED
    try:
        job.complete(w.member_id, 1, lease.epoch, lease.shard.index, 1.0, lease.shard.size, clock.now())
    except FailedPrecondition:
        pass  # refusing the completion is as good as ignoring it
    assert job.state is JobState.FAILED
    assert job.lease(w.member_id, 1, clock.now()).outcome is LeaseOutcome.JOB_DONE


def test_a_shard_whose_holders_keep_dying_is_quarantined_and_the_job_goes_on(clock):
    job = Job(SPEC.replace(epochs=2, shards_per_epoch=2), SAMPLES, INITIAL, max_shard_attempts=2)
    servers = start_training(job, clock)
    poison = None
    for _ in range(2):
        victim = worker(job, clock)
        beat(job, clock, servers)
        lease = job.lease(victim.member_id, victim.incarnation, clock.now()).lease
        poison = lease.shard.index if poison is None else poison
        assert lease.shard.index == poison  # the requeued shard comes back first
        clock.advance(SPEC.heartbeat_timeout_s + 1)
        beat(job, clock, servers)
        job.tick(clock.now())
    (event,) = kinds(job, EventKind.SHARD_QUARANTINED)
    assert event.shard == poison
    status = job.status(clock.now())
    assert status.quarantined_shards == (poison,)

    survivor = worker(job, clock)
    beat(job, clock, servers)
    done = []
    while (d := job.lease(survivor.member_id, 1, clock.now())).outcome is LeaseOutcome.GRANTED:
        job.complete(survivor.member_id, 1, d.lease.epoch, d.lease.shard.index, 0.1, 1, clock.now())
        done.append((d.lease.epoch, d.lease.shard.index))
    assert d.outcome is LeaseOutcome.EVALUATE
    assert done == [(0, 1 - poison), (1, 1 - poison)]  # every epoch skips the quarantined shard


def test_re_registering_does_not_count_towards_quarantine(clock):
    job = Job(SPEC, SAMPLES, INITIAL, max_shard_attempts=1)
    servers = start_training(job, clock)
    w = worker(job, clock)
    job.lease(w.member_id, 1, clock.now())
    worker(job, clock, member_id=w.member_id)  # a fenced worker comes back as incarnation 2
    beat(job, clock, servers)
    assert job.status(clock.now()).quarantined_shards == ()
    assert job.lease(w.member_id, 2, clock.now()).outcome is LeaseOutcome.GRANTED


@pytest.mark.parametrize(
    "loss, samples, message",
    [
        (float("nan"), 4, "loss must be a finite number"),
        (float("inf"), 4, "loss must be a finite number"),
        (-float("inf"), 4, "loss must be a finite number"),
        (1.0, -1, r"samples must lie in \[0, 10\]"),
        (1.0, 2**62, r"samples must lie in \[0, 10\]"),
    ],
)
def test_progress_and_completion_with_unusable_loss_or_samples_are_rejected_and_change_nothing(
    job, clock, loss, samples, message
):
    start_training(job, clock)
    w = worker(job, clock)
    lease = job.lease(w.member_id, 1, clock.now()).lease
    before = job.status(clock.now())
    with pytest.raises(InvalidArgument, match=message):
        job.progress(w.member_id, 1, 0, lease.shard.index, 4, loss=loss, samples=samples, now=clock.now())
    with pytest.raises(InvalidArgument, match=message):
        job.complete(w.member_id, 1, 0, lease.shard.index, loss=loss, samples=samples, now=clock.now())
    after = job.status(clock.now())
    assert (after.samples_trained, after.shard_completions, after.shards_leased) == (
        before.samples_trained, before.shard_completions, before.shards_leased
    )
    assert math.isnan(after.recent_loss)


def test_a_completion_of_a_shard_the_worker_never_leased_counts_nothing_and_emits_no_event(job, clock):
    start_training(job, clock)
    a, b = worker(job, clock), worker(job, clock)
    lease = job.lease(a.member_id, 1, clock.now()).lease
    job.complete(a.member_id, 1, 0, lease.shard.index, loss=1.0, samples=4, now=clock.now())
    events_before = len(job.events.after(0))
    with pytest.raises(FailedPrecondition, match="does not hold"):
        job.complete(b.member_id, 1, 0, lease.shard.index, loss=1.0, samples=4, now=clock.now())
    assert job.status(clock.now()).duplicate_completions_rejected == 0
    assert len(job.events.after(0)) == events_before
    assert not kinds(job, EventKind.DUPLICATE_COMPLETION_REJECTED)
