"""A state directory written by an earlier coordinator still restores. The fixture was written at
commit 0eff73a (before the state documents carried a format version): two parameter servers, one
of them restarted two steps back, a completed and a rejected duplicate completion, a worker
declared dead (a fencing round), a leased shard with progress and one complete checkpoint."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from coordinator.events import EventLog
from coordinator.job import Job, JobState, LeaseOutcome
from coordinator.membership import Role
from coordinator.state_codec import FORMAT_VERSION
from coordinator.statedb import SqliteJobStore
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import ConfigError

FIXTURE = Path(__file__).parent.parent / "fixtures" / "coordinator-state-0eff73a.sqlite"
SPEC = JobSpec(
    epochs=2, shards_per_epoch=4, parameter_servers=2, heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0
)
PARAMS = {"w": torch.ones(4, 2), "b": torch.zeros(2)}


def open_job(state_dir: Path, clock: FakeClock) -> Job:
    return Job(
        SPEC, 40, PARAMS, events=EventLog(wall_clock=lambda: 2000.0), store=SqliteJobStore(state_dir),
        now=clock.now(), wall_clock=lambda: 2000.0,
    )


def restored(tmp_path: Path, clock: FakeClock) -> Job:
    shutil.copyfile(FIXTURE, tmp_path / "coordinator.sqlite")
    return open_job(tmp_path, clock)


def test_a_state_written_before_format_versions_restores_every_count(tmp_path):
    clock = FakeClock()
    job = restored(tmp_path, clock)
    s = job.status(clock.now())
    assert job.restored and s.state is JobState.TRAINING
    assert (s.epoch, s.shards_completed_in_epoch, s.shards_leased, s.shards_pending) == (0, 1, 1, 2)
    assert (s.shard_completions, s.duplicate_completions_rejected, s.reassignments) == (1, 1, 1)
    assert (s.members_declared_dead, s.samples_trained, s.training_seconds) == (1, 14, 6.0)
    assert (s.layout_version, s.ps_restarts, s.steps_rolled_back, s.leases_expired) == (2, 1, 2, 0)
    assert job.completions() == [(0, 0, "w-1", 1)]
    members = {m.member.member_id: m for m in s.members}
    assert {k: (m.member.incarnation, m.member.alive, m.member.hostname, m.member.pid) for k, m in members.items()} == {
        "ps-0": (1, True, "h0", 10),
        "ps-1": (2, True, "h1", 12),
        "w-1": (1, True, "h2", 20),
        "w-2": (1, False, "h3", 21),
    }
    lease = members["w-1"].lease
    assert (lease.shard.index, lease.offset, lease.lease_id) == (1, 4, 2)
    layout, addresses = job.layout()
    assert {s: [t.name for t in ts] for s, ts in layout.assignment.items()} == {
        "ps-0": ["w[0:2]"], "ps-1": ["w[2:4]", "b"]
    }
    assert addresses == {"ps-0": "127.0.0.1:7000", "ps-1": "127.0.0.1:7002"}
    checkpoint = s.last_checkpoint
    assert checkpoint.checkpoint_id == "ckpt-000001" and checkpoint.reason == "nightly"
    assert {m: (r.version, r.path) for m, r in checkpoint.reports.items()} == {
        "ps-0": (8, "/ckpt/ps-0.pt"), "ps-1": (8, "/ckpt/ps-1.pt")
    }
    assert checkpoint.tensors == {"ps-0": ("w[0:2]",), "ps-1": ("w[2:4]", "b")}
    assert checkpoint.manifest_path == "state/checkpoints/ckpt-000001.json"
    assert job.events.next_sequence == 20  # 19 saved, then the restart's own event


def test_a_restored_old_state_goes_on_where_it_stopped(tmp_path):
    clock = FakeClock()
    job = restored(tmp_path, clock)
    # the fencing round is remembered: servers are asked to apply roster 1
    assert job.heartbeat("ps-0", 1, clock.now(), version=8).roster_version == 1
    job.heartbeat("ps-1", 2, clock.now(), version=6, roster_version=1)
    job.heartbeat("ps-0", 1, clock.now(), version=8, roster_version=1)
    w3 = job.register(Role.WORKER, "", clock.now())
    grant = job.lease(w3.member_id, w3.incarnation, clock.now())
    assert grant.outcome is LeaseOutcome.GRANTED and grant.lease.lease_id == 4  # ids are never reused
    checkpoint, new = job.request_checkpoint("after the upgrade", clock.now())
    assert new and checkpoint.checkpoint_id == "ckpt-000002"
    # the state it saves itself restores again, unchanged
    before = job.status(clock.now())
    again = open_job(tmp_path, clock)
    after = again.status(clock.now())
    assert (after.shards_leased, after.samples_trained, after.ps_restarts, after.steps_rolled_back) == (
        before.shards_leased, before.samples_trained, before.ps_restarts, before.steps_rolled_back
    )
    assert again.completions() == job.completions()
    assert again.checkpoint("ckpt-000002").reason == "after the upgrade"


def rewrite(state_dir: Path, name: str, change) -> None:
    db = sqlite3.connect(state_dir / "coordinator.sqlite")
    (body,) = db.execute("SELECT body FROM documents WHERE name = ?", (name,)).fetchone()
    db.execute("UPDATE documents SET body = ? WHERE name = ?", (json.dumps(change(json.loads(body))), name))
    db.commit()
    db.close()


def without(document: dict, *keys: str) -> dict:
    return {k: v for k, v in document.items() if k not in keys}


def test_a_state_from_before_servers_restarted_and_leases_had_ids_restores_with_their_defaults(tmp_path):
    shutil.copyfile(FIXTURE, tmp_path / "coordinator.sqlite")
    rewrite(tmp_path, "job", lambda job: without(
        job, "ps_restarts", "steps_rolled_back", "leases_expired", "ps_versions", "ps_lost", "fence_version",
        "checkpoints",
    ))
    rewrite(tmp_path, "members", lambda members: without(members, "fenced_rejections"))
    rewrite(tmp_path, "ledger", lambda ledger: {
        **without(ledger, "last_lease_id", "holders", "deaths", "quarantined"),
        "leases": [row[:5] for row in ledger["leases"]],
    })
    clock = FakeClock()
    job = open_job(tmp_path, clock)
    s = job.status(clock.now())
    assert (s.ps_restarts, s.steps_rolled_back, s.leases_expired, s.last_checkpoint) == (0, 0, 0, None)
    assert s.samples_trained == 14 and s.shard_completions == 1
    assert job.heartbeat("ps-0", 1, clock.now()).roster_version == 0  # no fencing round remembered
    lease = {m.member.member_id: m.lease for m in s.members}["w-1"]
    assert (lease.shard.index, lease.offset, lease.lease_id) == (1, 4, 0)


def test_a_state_written_in_a_newer_format_is_refused_and_left_alone(tmp_path):
    shutil.copyfile(FIXTURE, tmp_path / "coordinator.sqlite")
    db = sqlite3.connect(tmp_path / "coordinator.sqlite")
    db.execute("INSERT INTO documents (name, body) VALUES ('format', ?)", (json.dumps({"version": 99}),))
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="state format 99"):
        open_job(tmp_path, FakeClock())
    db = sqlite3.connect(tmp_path / "coordinator.sqlite")
    assert db.execute("SELECT body FROM documents WHERE name = 'format'").fetchone() == ('{"version": 99}',)
    db.close()


def test_a_restored_old_state_is_saved_in_the_current_format(tmp_path):
    restored(tmp_path, FakeClock())
    db = sqlite3.connect(tmp_path / "coordinator.sqlite")
    (body,) = db.execute("SELECT body FROM documents WHERE name = 'format'").fetchone()
    db.close()
    assert json.loads(body) == {"version": FORMAT_VERSION}
