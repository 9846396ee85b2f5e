"""A coordinator whose state directory refuses commits (SQLite's "database or disk is full") fails
the call with StateNotSaved (UNAVAILABLE: retryable), keeps its memory equal to what is on disk,
and takes the same call again once there is room. The full disk is real SQLite behaviour: a
``max_page_count`` pinned to the file's current size, which binds root too. Fake clock."""

from __future__ import annotations

import sqlite3

import grpc
import pytest
import torch

from coordinator.job import Job, JobState
from coordinator.membership import Role
from coordinator.statedb import SqliteJobStore
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import StateNotSaved
from lepton.rpc import status_for

SPEC = JobSpec(epochs=2, shards_per_epoch=3, parameter_servers=1, heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0)
PARAMS = {"w": torch.ones(3, 2), "b": torch.zeros(2)}


class FullDisk:
    """Stands in for the store's connection: while ``full``, COMMIT fails the way SQLite's does on
    a full file system (it has already rolled the transaction back itself, so a second ROLLBACK
    would fail with "no transaction is active", the message the issue saw)."""

    def __init__(self, db) -> None:
        self._db = db
        self.full = False

    def execute(self, sql, *args):
        if self.full and sql == "COMMIT":
            self._db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


def full_disk(store: SqliteJobStore) -> FullDisk:
    disk = FullDisk(store._db)
    store._db = disk
    return disk


def training_job(tmp_path, clock):
    store = SqliteJobStore(tmp_path)
    job = Job(SPEC, 30, PARAMS, store=store, now=clock.now())
    ps = job.register(Role.PARAMETER_SERVER, "127.0.0.1:1", clock.now())
    job.ready(ps.member_id, ps.incarnation, job.layout_version, clock.now())
    worker = job.register(Role.WORKER, "", clock.now())
    assert job.state is JobState.TRAINING
    return job, store, worker


def snapshot(job: Job, clock: FakeClock):
    s = job.status(clock.now())
    return (
        s.state, s.epoch, s.shard_completions, s.samples_trained, s.shards_pending, s.shards_leased,
        sorted((m.member.member_id, m.member.incarnation, m.member.alive) for m in s.members),
        job.events.next_sequence, [e.sequence for e in job.events.after(-1)],
    )


def test_a_refused_commit_is_unavailable_not_internal():
    assert status_for(StateNotSaved("disk full")) is grpc.StatusCode.UNAVAILABLE


def test_a_registration_the_disk_refuses_changes_nothing_and_succeeds_once_there_is_room(tmp_path):
    clock = FakeClock()
    job, store, _ = training_job(tmp_path, clock)
    before = snapshot(job, clock)
    # SQLite's own refusal: no page more than the file holds now (max_page_count binds root too).
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StateNotSaved, match="database or disk is full"):
        for _ in range(50):  # each registration needs a little more room; one soon needs a page
            job.register(Role.WORKER, "", clock.now())
            before = snapshot(job, clock)
    assert snapshot(job, clock) == before
    store._db.execute("PRAGMA max_page_count = 1073741823")
    job.register(Role.WORKER, "", clock.now())
    assert job.saves_failed == 1 and job.saves_failing_since is None


def test_a_completion_the_disk_refuses_is_not_counted_and_its_retry_is_not_a_duplicate(tmp_path):
    clock = FakeClock()
    job, store, worker = training_job(tmp_path, clock)
    lease = job.lease(worker.member_id, worker.incarnation, clock.now()).lease
    disk = full_disk(store)
    disk.full = True
    before = snapshot(job, clock)
    with pytest.raises(StateNotSaved):
        job.complete(worker.member_id, worker.incarnation, lease.epoch, lease.shard.index, 0.5, 10, clock.now())
    assert snapshot(job, clock) == before
    assert job.status(clock.now()).shard_completions == 0
    disk.full = False
    job.complete(worker.member_id, worker.incarnation, lease.epoch, lease.shard.index, 0.5, 10, clock.now())
    assert job.status(clock.now()).shard_completions == 1


def test_memory_after_a_refused_commit_is_what_a_restart_would_load(tmp_path):
    clock = FakeClock()
    job, store, worker = training_job(tmp_path, clock)
    job.lease(worker.member_id, worker.incarnation, clock.now())
    disk = full_disk(store)
    disk.full = True
    with pytest.raises(StateNotSaved):
        job.register(Role.WORKER, "", clock.now())
    with pytest.raises(StateNotSaved):
        job.lease(worker.member_id, worker.incarnation, clock.now())  # holds one already: renews or refuses
    disk.full = False
    reopened = Job(SPEC, 30, PARAMS, store=SqliteJobStore(tmp_path), now=clock.now())
    mine, theirs = job.status(clock.now()), reopened.status(clock.now())
    assert (mine.state, mine.epoch, mine.shard_completions, mine.shards_pending, mine.shards_leased) == (
        theirs.state, theirs.epoch, theirs.shard_completions, theirs.shards_pending, theirs.shards_leased
    )
    assert sorted(m.member.member_id for m in mine.members) == sorted(m.member.member_id for m in theirs.members)


def test_deaths_the_disk_refuses_are_retried_by_a_later_tick(tmp_path):
    clock = FakeClock()
    job, store, worker = training_job(tmp_path, clock)
    disk = full_disk(store)
    disk.full = True
    clock.advance(SPEC.heartbeat_timeout_s + 1)
    with pytest.raises(StateNotSaved):
        job.tick(clock.now())
    assert job.status(clock.now()).members_declared_dead == 0
    disk.full = False
    clock.advance(3 * SPEC.heartbeat_timeout_s)  # the rollback gave every member a fresh timeout
    assert {m.member_id for m in job.tick(clock.now())} >= {worker.member_id}


def test_the_expiry_loop_gives_up_with_a_retryable_code_when_commits_stay_refused(tmp_path):
    import threading

    from coordinator.main import ExpiryLoop
    from lepton.process import EXIT_OK, EXIT_STATE_NOT_SAVED

    clock = FakeClock()
    job, store, worker = training_job(tmp_path, clock)
    stop = threading.Event()
    loop = ExpiryLoop(job, clock.now, stop, give_up_after_s=30.0)
    disk = full_disk(store)
    disk.full = True
    with pytest.raises(StateNotSaved):
        job.register(Role.WORKER, "", clock.now())
    clock.advance(20.0)
    loop.tick()  # 20 s of refusals: keep trying
    assert loop.exit_code == EXIT_OK and not stop.is_set()
    disk.full = False
    job.register(Role.WORKER, "", clock.now())  # space came back: the run of failures ends
    loop.tick()
    disk.full = True
    with pytest.raises(StateNotSaved):
        job.register(Role.WORKER, "", clock.now())
    clock.advance(29.0)
    loop.tick()
    assert not stop.is_set()  # the clock restarted with the new run of failures
    clock.advance(2.0)
    loop.tick()
    assert stop.is_set() and loop.exit_code == EXIT_STATE_NOT_SAVED
