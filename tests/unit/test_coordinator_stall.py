"""A coordinator that stalls (SIGSTOP, a starved CPU) judges nobody for the time it was away."""

from __future__ import annotations

import pytest
import torch

from coordinator.events import EventKind, EventLog
from coordinator.job import Job, JobState, LeaseOutcome
from coordinator.membership import Member, MembershipTable, Role
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import InvalidArgument

SPEC = JobSpec(
    epochs=1, shards_per_epoch=3, parameter_servers=2, heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0,
    lease_timeout_s=10.0,
)
INITIAL = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def job() -> Job:
    return Job(
        SPEC, 30, INITIAL, events=EventLog(wall_clock=lambda: 0.0),
        stall_threshold_s=SPEC.heartbeat_interval_s,
    )


def training(job: Job, clock: FakeClock) -> tuple[list[Member], list[Member]]:
    servers = [job.register(Role.PARAMETER_SERVER, f"10.0.0.{i}:7000", clock.now()) for i in range(2)]
    for ps in servers:
        job.ready(ps.member_id, ps.incarnation, job.layout_version, clock.now())
    workers = [job.register(Role.WORKER, "", clock.now()) for _ in range(2)]
    assert job.state is JobState.TRAINING
    return servers, workers


def beat(job: Job, clock: FakeClock, members: list[Member]) -> None:
    for m in members:
        reply = job.heartbeat(m.member_id, m.incarnation, clock.now())
        if m.role is Role.PARAMETER_SERVER:
            job.heartbeat(m.member_id, m.incarnation, clock.now(), roster_version=reply.roster_version)


def run_for(job: Job, clock: FakeClock, seconds: float, beating: list[Member]) -> list[Member]:
    """The coordinator awake: ticks every period; ``beating`` heartbeat at each tick."""
    dead: list[Member] = []
    for _ in range(round(seconds / job.tick_interval_s)):
        clock.advance(job.tick_interval_s)
        beat(job, clock, beating)
        dead += job.tick(clock.now())
    return dead


def test_a_stall_longer_than_the_heartbeat_timeout_declares_nobody_dead(job, clock):
    servers, workers = training(job, clock)
    everyone = [*servers, *workers]
    assert run_for(job, clock, 2.0, everyone) == []

    clock.advance(8.0)  # SIGSTOP: no tick and no heartbeat is heard for 8 s (timeout 3 s)
    assert job.tick(clock.now()) == []
    assert job.stalls_detected == 1
    assert run_for(job, clock, 5.0, everyone) == []  # everyone heartbeats again after the resume

    status = job.status(clock.now())
    assert status.members_declared_dead == 0
    assert job.state is JobState.TRAINING
    assert not [e for e in job.events.after(0) if e.kind is EventKind.MEMBER_DECLARED_DEAD]


def test_a_member_silent_for_the_timeout_after_the_stall_is_still_declared_dead(job, clock):
    servers, workers = training(job, clock)
    survivors, (silent,) = [*servers, workers[0]], workers[1:]
    assert run_for(job, clock, 1.0, [*survivors, silent]) == []
    clock.advance(8.0)
    assert job.tick(clock.now()) == []

    # The silent worker's last word came one tick before the stall: awake, the coordinator
    # counts its silence from there and it dies once that exceeds the timeout.
    assert run_for(job, clock, SPEC.heartbeat_timeout_s - 0.5, survivors) == []
    dead = run_for(job, clock, 1.0, survivors)
    assert [(m.member_id, m.incarnation) for m in dead] == [(silent.member_id, silent.incarnation)]
    assert job.status(clock.now()).members_declared_dead == 1


def test_repeated_stalls_do_not_hide_a_dead_member_forever(job, clock):
    servers, workers = training(job, clock)
    survivors, (silent,) = [*servers, workers[0]], workers[1:]
    dead: list[Member] = []
    for _ in range(40):  # the loop always late by a second: each tick counts one period of silence
        clock.advance(1.0)
        beat(job, clock, survivors)
        dead += job.tick(clock.now())
    assert [m.member_id for m in dead] == [silent.member_id]


def test_a_lease_outlives_a_stall_longer_than_the_lease_timeout(job, clock):
    servers, workers = training(job, clock)
    holder = workers[0]
    granted = job.lease(holder.member_id, holder.incarnation, clock.now())
    assert granted.outcome is LeaseOutcome.GRANTED
    assert run_for(job, clock, 1.0, [*servers, *workers]) == []
    clock.advance(SPEC.lease_timeout_s + 2.0)
    assert job.tick(clock.now()) == []
    assert run_for(job, clock, 2.0, [*servers, *workers]) == []
    assert job.status(clock.now()).shards_leased == 1
    assert job.leases_expired == 0


def test_without_stall_detection_the_same_gap_kills_everyone(clock):
    job = Job(SPEC, 30, INITIAL, events=EventLog(wall_clock=lambda: 0.0))
    servers, workers = training(job, clock)
    assert run_for(job, clock, 1.0, [*servers, *workers]) == []
    clock.advance(8.0)
    assert len(job.tick(clock.now())) == 4


def test_a_stall_threshold_within_one_tick_is_refused():
    with pytest.raises(InvalidArgument):
        Job(SPEC, 30, INITIAL, stall_threshold_s=0.1)


def test_membership_excuses_a_stall_but_never_past_now(clock):
    table = MembershipTable(heartbeat_timeout_s=3.0)
    early = table.register(Role.WORKER, "", clock.now())
    clock.advance(2.0)
    late = table.register(Role.WORKER, "", clock.now())
    clock.advance(8.0)
    table.excuse(9.0, clock.now())
    assert early.last_heartbeat == clock.now() - 1.0
    assert late.last_heartbeat == clock.now()
    assert table.expire(clock.now()) == []
