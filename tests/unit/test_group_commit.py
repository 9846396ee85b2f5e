"""How the coordinator saves its state: only the rows a change touched, committed in batches by the
first waiter with the job lock released, heartbeats never waiting for either, progress committed
by the next batch or tick, and a refused batch failing every change it carried. A recording fake
store around SQLite, a fake clock; threads only where a commit must be caught in flight."""

from __future__ import annotations

import threading

import pytest
import torch

from coordinator.job import Job, JobState, LeaseOutcome
from coordinator.ledger import ShardLedger
from coordinator.membership import MembershipTable, Role
from coordinator.state_codec import MEMBER_ROWS, SHARD_ROWS, _assemble
from coordinator.statedb import SqliteJobStore
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import StateNotSaved
from tests.support import wait_until

SPEC = JobSpec(epochs=2, shards_per_epoch=6, parameter_servers=1, heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0)
PARAMS = {"w": torch.ones(3, 2), "b": torch.zeros(2)}


class RecordingStore(SqliteJobStore):
    """SQLite, plus what each save carried; ``gate`` (when set) holds a save until it is opened,
    ``refuse`` makes the next saves fail as a full disk does."""

    def __init__(self, state_dir) -> None:
        super().__init__(state_dir)
        self.saves: list[dict] = []
        self.gate: threading.Event | None = None
        self.saving = threading.Event()
        self.refuse = False

    def save(self, documents, new_completions=(), new_events=(), rows=None):
        self.saving.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        if self.refuse:
            raise StateNotSaved("database or disk is full")
        completions, events = list(new_completions), list(new_events)
        super().save(documents, completions, events, rows)
        self.saves.append({"rows": {k: dict(v) for k, v in (rows or {}).items()}, "completions": completions})


def training(tmp_path, workers: int = 3):
    clock = FakeClock()
    store = RecordingStore(tmp_path)
    job = Job(SPEC, 60, PARAMS, store=store, now=clock.now())
    ps = job.register(Role.PARAMETER_SERVER, "127.0.0.1:1", clock.now())
    job.ready(ps.member_id, ps.incarnation, job.layout_version, clock.now())
    members = [job.register(Role.WORKER, "", clock.now()) for _ in range(workers)]
    assert job.state is JobState.TRAINING
    return job, store, clock, members


def test_a_completion_rewrites_its_shard_row_and_no_member_row(tmp_path):
    job, store, clock, (w, *_) = training(tmp_path)
    lease = job.lease(w.member_id, w.incarnation, clock.now()).lease
    saved = len(store.saves)
    job.complete(w.member_id, w.incarnation, lease.epoch, lease.shard.index, 0.5, 10, clock.now())
    assert len(store.saves) == saved + 1
    last = store.saves[-1]
    assert last["rows"][MEMBER_ROWS] == {}
    assert list(last["rows"][SHARD_ROWS]) == [str(lease.shard.index)]
    assert last["rows"][SHARD_ROWS][str(lease.shard.index)]["done"] is True
    assert [(c.shard, c.member_id) for c in last["completions"]] == [(lease.shard.index, w.member_id)]


def test_a_worker_heartbeat_commits_nothing_and_answers_from_the_committed_view(tmp_path):
    job, store, clock, (w, *_) = training(tmp_path)
    saved = len(store.saves)
    reply = job.heartbeat(w.member_id, w.incarnation, clock.now())
    assert len(store.saves) == saved
    assert (reply.state, reply.layout_version) == (JobState.TRAINING, job.layout_version)


def test_progress_waits_for_no_commit_and_the_tick_commits_it(tmp_path):
    job, store, clock, (w, *_) = training(tmp_path)
    lease = job.lease(w.member_id, w.incarnation, clock.now()).lease
    saved = len(store.saves)
    job.progress(w.member_id, w.incarnation, lease.epoch, lease.shard.index, 4, 0.5, 4, clock.now())
    job.progress(w.member_id, w.incarnation, lease.epoch, lease.shard.index, 7, 0.5, 3, clock.now())
    assert len(store.saves) == saved  # coalesced, not yet committed
    job.tick(clock.now())
    assert len(store.saves) == saved + 1  # both reports in one commit
    assert store.saves[-1]["rows"][SHARD_ROWS][str(lease.shard.index)]["lease"][3] == 7
    reopened = Job(SPEC, 60, PARAMS, store=SqliteJobStore(tmp_path), now=clock.now())
    status = {m.member.member_id: m.lease for m in reopened.status(clock.now()).members}
    assert status[w.member_id].offset == 7


def test_changes_made_while_a_commit_is_written_go_out_together_in_the_next_one(tmp_path):
    job, store, clock, (a, b, c) = training(tmp_path)
    store.gate, store.saving = threading.Event(), threading.Event()
    answers: dict[str, object] = {}

    def lease(member) -> None:
        answers[member.member_id] = job.lease(member.member_id, member.incarnation, clock.now()).outcome

    first = threading.Thread(target=lease, args=(a,))
    first.start()
    assert store.saving.wait(10)  # a's commit is being written, the job lock released
    assert job.status(clock.now()).shards_leased == 1  # readers are not blocked by it
    assert job.heartbeat(b.member_id, b.incarnation, clock.now()).state is JobState.TRAINING
    others = [threading.Thread(target=lease, args=(m,)) for m in (b, c)]
    for t in others:
        t.start()
    wait_until(lambda: job.status(clock.now()).shards_leased == 3, 10, "b and c leased in memory")
    saved = len(store.saves)
    store.gate.set()
    for t in (first, *others):
        t.join(10)
    assert answers == {m.member_id: LeaseOutcome.GRANTED for m in (a, b, c)}
    assert len(store.saves) == saved + 2  # a's commit, then one for b and c
    assert len(store.saves[-1]["rows"][SHARD_ROWS]) == 2


def test_a_refused_batch_fails_every_change_it_carried_and_memory_is_what_disk_holds(tmp_path):
    job, store, clock, (a, b, _) = training(tmp_path)
    before = job.status(clock.now())
    store.gate, store.saving = threading.Event(), threading.Event()
    store.refuse = True
    errors: list[Exception] = []

    def lease(member) -> None:
        try:
            job.lease(member.member_id, member.incarnation, clock.now())
        except StateNotSaved as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lease, args=(m,)) for m in (a, b)]
    threads[0].start()
    assert store.saving.wait(10)
    threads[1].start()
    wait_until(lambda: job.status(clock.now()).shards_leased == 2, 10, "b leased in memory")
    store.gate.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 2 and "disk is full" in str(errors[0])
    after = job.status(clock.now())
    assert (after.shards_leased, after.shards_pending) == (before.shards_leased, before.shards_pending) == (0, 6)
    store.refuse, store.gate = False, None
    assert job.lease(a.member_id, a.incarnation, clock.now()).outcome is LeaseOutcome.GRANTED


def test_shard_and_member_rows_assemble_into_the_ledger_and_table_they_came_from():
    ledger = ShardLedger(60, 6, epochs=3, max_attempts=2)
    for member in ("w-0", "w-1", "w-2"):
        ledger.lease(member, 1)
    ledger.progress("w-0", 1, 0, 0, 4)
    ledger.complete("w-1", 1, 0, 1)
    ledger.requeue("w-2", died=True)  # back at the front of the queue
    members = MembershipTable(5.0)
    for _ in range(3):
        members.register(Role.WORKER, "", 0.0)
    members.depart("worker-1", 1)
    rows = {
        MEMBER_ROWS: {m.member_id: members.row(m.member_id) for m in members.members()},
        SHARD_ROWS: {str(i): ledger.shard_row(i) for i in range(len(ledger.shards))},
    }
    table, state = _assemble({"members": {"fenced_rejections": 0}, "ledger": ledger.counters()}, rows)
    expected = ledger.to_state()
    for key in ("holders", "leases"):
        assert sorted(map(tuple, state.pop(key))) == sorted(map(tuple, expected.pop(key)))
    assert state == expected
    assert table == members.to_state()


def test_a_long_polled_lease_is_granted_as_soon_as_a_shard_is_free():
    clock = FakeClock()
    spec = JobSpec(epochs=1, shards_per_epoch=1, parameter_servers=1, heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0)
    job = Job(spec, 10, PARAMS, now=clock.now())
    ps = job.register(Role.PARAMETER_SERVER, "127.0.0.1:1", clock.now())
    job.ready(ps.member_id, ps.incarnation, job.layout_version, clock.now())
    a, b = (job.register(Role.WORKER, "", clock.now()) for _ in range(2))
    assert job.lease(a.member_id, a.incarnation, clock.now()).outcome is LeaseOutcome.GRANTED
    assert (
        job.lease(b.member_id, b.incarnation, clock.now(), max_wait_s=0.0, clock=clock.now).outcome is LeaseOutcome.WAIT
    )
    answer: list = []
    waiter = threading.Thread(
        target=lambda: answer.append(
            job.lease(b.member_id, b.incarnation, clock.now(), max_wait_s=5.0, clock=clock.now)
        )
    )
    waiter.start()
    wait_until(lambda: job._lease_waiters == 1, 10, "b's long poll waiting")
    job.deregister(a.member_id, a.incarnation, clock.now())  # a's shard goes back to the queue
    waiter.join(10)
    assert answer[0].outcome is LeaseOutcome.GRANTED and answer[0].lease.shard.index == 0
    with pytest.raises(Exception, match="max_wait_s"):
        job.lease(b.member_id, b.incarnation, clock.now(), max_wait_s=float("nan"), clock=clock.now)
