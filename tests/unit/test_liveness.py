"""Liveness at scale on a fake clock: the heartbeat interval the coordinator directs and its timeout
(coordinator/liveness.py), and calls other than heartbeats that keep a worker alive."""

from __future__ import annotations

import pytest
import torch

from coordinator.events import EventLog
from coordinator.job import Job, JobState, LeaseOutcome
from coordinator.liveness import LivenessScale
from coordinator.membership import Member, Role
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import InvalidArgument

INTERVAL_S, TIMEOUT_S = 0.5, 3.0
SPEC = JobSpec(
    epochs=1, shards_per_epoch=4, parameter_servers=1, heartbeat_interval_s=INTERVAL_S,
    heartbeat_timeout_s=TIMEOUT_S, lease_timeout_s=60.0,
)


def test_few_workers_beat_at_the_jobs_interval():
    scale = LivenessScale(INTERVAL_S, TIMEOUT_S, beats_per_s=400)
    scale.update(100, now=0.0)  # 200 beats a second at 0.5 s: under the aim
    assert scale.announced() == INTERVAL_S
    assert scale.worker_timeout_s(0.0) == TIMEOUT_S


def test_many_workers_are_told_to_beat_less_often_and_get_a_longer_timeout_alike():
    scale = LivenessScale(INTERVAL_S, TIMEOUT_S, beats_per_s=400)
    scale.update(1000, now=0.0)  # 2,000 beats a second at 0.5 s: five times the aim
    assert scale.announced() == pytest.approx(2.5)
    assert scale.worker_timeout_s(0.0) == pytest.approx(15.0)
    scale.update(100_000, now=0.0)
    assert scale.announced() == pytest.approx(INTERVAL_S * scale.max_scale)  # bounded


def test_the_timeout_shrinks_only_after_every_worker_told_the_long_interval_had_time_to_hear_the_short():
    scale = LivenessScale(INTERVAL_S, TIMEOUT_S, beats_per_s=400)
    scale.update(1000, now=10.0)  # 2.5 s interval, 15 s timeout, last announced at 10
    scale.update(100, now=11.0)  # most workers left: back to 0.5 s
    assert scale.announced() == INTERVAL_S
    # A worker that heard 2.5 s at 11.0 (the last moment it was announced) may stay silent till 26.
    assert scale.worker_timeout_s(25.9) == pytest.approx(15.0)
    assert scale.worker_timeout_s(26.1) == pytest.approx(TIMEOUT_S)


def test_bad_settings_are_refused():
    with pytest.raises(InvalidArgument):
        LivenessScale(0.0, TIMEOUT_S)
    with pytest.raises(InvalidArgument):
        LivenessScale(INTERVAL_S, TIMEOUT_S, max_scale=0.5)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def training_job(clock: FakeClock, workers: int, beats_per_s: float = 400) -> tuple[Job, Member, list[Member]]:
    job = Job(SPEC, 40, {"w": torch.zeros(4, 3)}, events=EventLog(wall_clock=lambda: 0.0))
    job._liveness = LivenessScale(INTERVAL_S, TIMEOUT_S, beats_per_s=beats_per_s)
    ps = job.register(Role.PARAMETER_SERVER, "10.0.0.1:7000", clock.now())
    job.ready(ps.member_id, ps.incarnation, job.layout_version, clock.now())
    members = [job.register(Role.WORKER, "", clock.now()) for _ in range(workers)]
    assert job.state is JobState.TRAINING
    return job, ps, members


def run(job: Job, clock: FakeClock, seconds: float, beating: list[Member]) -> list[Member]:
    """Ticks every tick interval for ``seconds``; ``beating`` heartbeat at every tick."""
    dead: list[Member] = []
    for _ in range(round(seconds / job.tick_interval_s)):
        clock.advance(job.tick_interval_s)
        for m in beating:
            job.heartbeat(m.member_id, m.incarnation, clock.now())
        dead += job.tick(clock.now())
    return dead


def test_a_workers_heartbeat_reply_directs_the_scaled_interval_and_silence_is_judged_alike(clock):
    job, ps, workers = training_job(clock, 4, beats_per_s=2)  # 4 workers at 0.5 s = 8 beats/s: scale 4
    run(job, clock, 0.25, [ps, *workers])
    reply = job.heartbeat(workers[0].member_id, workers[0].incarnation, clock.now())
    assert reply.interval_s == pytest.approx(2.0)
    # A worker beating every 2 s (well past the job's 3 s timeout in silences of 2 s) lives on...
    silent = workers[0]
    dead = run(job, clock, 10.0, [ps, *workers[1:]])
    assert silent not in dead  # ...and one silent for 10 s is still within 4 x 3 s
    dead = run(job, clock, 2.5, [ps, *workers[1:]])
    assert [m.member_id for m in dead] == [silent.member_id]  # past 12 s: dead, as before
    # The parameter server keeps the job's timeout: silent for more than 3 s, it is lost.
    dead = run(job, clock, 3.5, workers[1:])
    assert ps.member_id in {m.member_id for m in dead}


def test_a_lease_request_keeps_a_worker_alive_like_a_heartbeat(clock):
    job, ps, (w,) = training_job(clock, 1)
    for _ in range(20):  # 5 s of asking for work and no heartbeat, past the 3 s timeout
        clock.advance(job.tick_interval_s)
        job.heartbeat(ps.member_id, ps.incarnation, clock.now())
        decision = job.lease(w.member_id, w.incarnation, clock.now())
        assert decision.outcome in (LeaseOutcome.GRANTED, LeaseOutcome.WAIT)
        assert job.tick(clock.now()) == []
    dead = run(job, clock, TIMEOUT_S + 0.5, [ps])
    assert [m.member_id for m in dead] == [w.member_id]  # once silent, it dies on time


def test_the_directed_interval_stays_within_a_quarter_of_the_lease_timeout(clock):
    spec = JobSpec(
        epochs=1, shards_per_epoch=4, parameter_servers=1, heartbeat_interval_s=INTERVAL_S,
        heartbeat_timeout_s=TIMEOUT_S, lease_timeout_s=4.0,
    )
    job = Job(spec, 40, {"w": torch.zeros(4, 3)}, events=EventLog(wall_clock=lambda: 0.0))
    members = [job.register(Role.WORKER, "", clock.now()) for _ in range(2000)]
    clock.advance(job.tick_interval_s)
    job.tick(clock.now())
    reply = job.heartbeat(members[0].member_id, members[0].incarnation, clock.now())
    assert reply.interval_s == pytest.approx(1.0)  # 2,000 workers would want 2.5 s; the lease allows 1 s
