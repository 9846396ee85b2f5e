"""The coordinator's checkpoint manifest and the Job around it, with a fake clock: ids, targets,
retargets, completion, failure, durability and the final checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator.checkpoints import NOW, CheckpointManifest, CheckpointReport
from coordinator.events import EventKind, EventLog
from coordinator.job import EvaluationResult, Job, JobState, LeaseOutcome
from coordinator.membership import Role
from coordinator.statedb import SqliteJobStore
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import FailedPrecondition, InvalidArgument, NotFound, NotReady

TENSORS = {"ps-0": ["w"], "ps-1": ["b"]}


def report(checkpoint, version, path="/x.pt", **kw) -> CheckpointReport:
    return CheckpointReport(checkpoint.checkpoint_id, checkpoint.target_version, version, path, **kw)


def test_async_checkpoint_records_each_servers_version_and_completes_when_all_reported():
    clock = FakeClock()
    book = CheckpointManifest("async", 0.5)
    ckpt, new = book.request(TENSORS, {"ps-0": 7, "ps-1": 9}, True, clock.now(), 1.0, "nightly")
    assert new and ckpt.checkpoint_id == "ckpt-000001" and ckpt.target_version == NOW
    assert book.order(True, clock.now()).target_version == NOW
    assert book.report("ps-0", report(ckpt, 7, "/a.pt"), clock.now(), 2.0) is None
    with pytest.raises(NotFound):
        book.get()  # nothing complete yet
    clock.advance(0.4)
    done = book.report("ps-1", report(ckpt, 9, "/b.pt"), clock.now(), 3.0)
    assert done is not None and done.complete and not done.consistent  # async: no global cut
    assert done.completed_after_s == pytest.approx(0.4)
    assert {r.version for r in book.get().reports.values()} == {7, 9}
    assert book.order(True, clock.now()) is None


def test_a_second_request_while_one_is_pending_gets_the_pending_id():
    book = CheckpointManifest("async", 0.5)
    first, _ = book.request(TENSORS, {}, True, 0.0, 0.0)
    again, new = book.request(TENSORS, {}, True, 1.0, 0.0)
    assert not new and again.checkpoint_id == first.checkpoint_id


def test_sync_targets_a_version_ahead_of_the_servers_and_retargets_on_a_miss():
    clock = FakeClock()
    book = CheckpointManifest("sync", 0.5)
    book.observe("ps-0", 100, clock.now())
    clock.advance(0.5)
    book.observe("ps-0", 120, clock.now())  # 40 steps/s: lead = 40 * 3 * 0.5 = 60
    ckpt, _ = book.request(TENSORS, {"ps-0": 120, "ps-1": 119}, True, clock.now(), 0.0)
    assert ckpt.target_version == 180
    # A report at another version than the target is not what was ordered: ignored.
    assert book.report("ps-0", report(ckpt, 181), clock.now(), 0.0) is None
    assert book.report("ps-0", report(ckpt, 180), clock.now(), 0.0) is None
    # ps-1 was past 180 before it saw the order: everyone is asked again, further ahead.
    book.report("ps-1", CheckpointReport(ckpt.checkpoint_id, 180, 185, missed=True), clock.now(), 0.0)
    order = book.order(True, clock.now())
    assert order.target_version == 185 + 120 and book.get(ckpt.checkpoint_id).reports == {}
    # A late answer to the old target changes nothing.
    assert book.report("ps-0", CheckpointReport(ckpt.checkpoint_id, 180, 180, "/a.pt"), clock.now(), 0.0) is None
    book.report("ps-0", CheckpointReport(ckpt.checkpoint_id, 305, 305, "/a.pt"), clock.now(), 0.0)
    done = book.report("ps-1", CheckpointReport(ckpt.checkpoint_id, 305, 305, "/b.pt"), clock.now(), 0.0)
    assert done is not None and done.consistent


def test_sync_target_becomes_now_when_training_ends_or_the_checkpoint_stalls():
    clock = FakeClock()
    book = CheckpointManifest("sync", 0.5, stall_s=10.0)
    ckpt, _ = book.request(TENSORS, {"ps-0": 10}, True, clock.now(), 0.0)
    assert ckpt.target_version > 10
    assert book.order(False, clock.now()).target_version == NOW  # training over
    book2 = CheckpointManifest("sync", 0.5, stall_s=10.0)
    ckpt2, _ = book2.request(TENSORS, {"ps-0": 10}, True, clock.now(), 0.0)
    assert book2.order(True, clock.now()).target_version == ckpt2.target_version
    clock.advance(10.5)
    assert book2.order(True, clock.now()).target_version == NOW


def test_a_server_that_cannot_write_fails_the_checkpoint_and_frees_the_slot():
    book = CheckpointManifest("async", 0.5)
    ckpt, _ = book.request(TENSORS, {}, True, 0.0, 0.0)
    failed = book.report("ps-0", report(ckpt, 3, "", error="no --state-dir"), 0.0, 0.0)
    assert failed is not None and failed.error == "ps-0: no --state-dir" and not failed.complete
    nxt, new = book.request(TENSORS, {}, True, 1.0, 0.0)
    assert new and nxt.checkpoint_id == "ckpt-000002"


@pytest.mark.parametrize(
    "bad",
    [
        CheckpointReport("nonsense", 0, 1, "/a.pt"),
        CheckpointReport("ckpt-000001", 0, -1, "/a.pt"),
        CheckpointReport("ckpt-000001", 0, 1, ""),
    ],
)
def test_malformed_reports_are_invalid_and_change_nothing(bad):
    book = CheckpointManifest("async", 0.5)
    ckpt, _ = book.request(TENSORS, {}, True, 0.0, 0.0)
    before = book.to_state()
    with pytest.raises(InvalidArgument):
        book.report("ps-0", bad, 0.0, 0.0)
    assert book.to_state() == before
    with pytest.raises(InvalidArgument):
        book.get("../etc")
    with pytest.raises(NotFound):
        book.get("ckpt-000099")
    with pytest.raises(InvalidArgument):
        book.request(TENSORS, {}, True, 0.0, 0.0, reason="x" * 201)


# --- through the Job ---------------------------------------------------------------------------

SPEC = JobSpec(epochs=1, shards_per_epoch=1, parameter_servers=2, heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0)
PARAMS = {"w": torch.ones(4, 3), "b": torch.zeros(3)}


def training_job(clock: FakeClock, store=None) -> tuple[Job, list]:
    job = Job(SPEC, 10, PARAMS, events=EventLog(wall_clock=lambda: 0.0), store=store, now=clock.now(),
              wall_clock=lambda: 1234.0)
    servers = [job.register(Role.PARAMETER_SERVER, f"10.0.0.{i}:7000", clock.now()) for i in range(2)]
    for ps in servers:
        job.ready(ps.member_id, ps.incarnation, job.layout_version, clock.now())
    return job, servers


def test_job_orders_servers_through_heartbeats_and_keeps_the_manifest_durably(tmp_path):
    clock = FakeClock()
    job, servers = training_job(clock, SqliteJobStore(tmp_path))
    with pytest.raises(InvalidArgument):
        job.request_checkpoint("r" * 300, clock.now())
    ckpt, new = job.request_checkpoint("before the upgrade", clock.now())
    assert new
    for i, ps in enumerate(servers):
        order = job.heartbeat(ps.member_id, ps.incarnation, clock.now()).checkpoint
        assert order.checkpoint_id == ckpt.checkpoint_id
        job.heartbeat(ps.member_id, ps.incarnation, clock.now(),
                      checkpoint=CheckpointReport(order.checkpoint_id, order.target_version, 0, f"/ps{i}.pt"))
    assert job.heartbeat(servers[0].member_id, servers[0].incarnation, clock.now()).checkpoint is None
    status = job.status(clock.now())
    assert status.last_checkpoint.checkpoint_id == ckpt.checkpoint_id
    manifest = json.loads((tmp_path / "checkpoints" / f"{ckpt.checkpoint_id}.json").read_text())
    assert manifest["format"] == "lepton-checkpoint-manifest/1" and manifest["reason"] == "before the upgrade"
    assert sorted(n for names in manifest["tensors"].values() for n in names) == ["b", "w[0:2]", "w[2:4]"]
    assert manifest["slices"]["w[2:4]"] == {"parameter": "w", "row_offset": 2, "parameter_shape": [4, 3]}
    assert {r["path"] for r in manifest["reports"].values()} == {"/ps0.pt", "/ps1.pt"}
    assert [e.kind for e in job.events.after(0)][-1] is EventKind.CHECKPOINT_COMPLETED
    # The coordinator restarts on the same store: the manifest is still there.
    restored = Job(SPEC, 10, PARAMS, store=SqliteJobStore(tmp_path), now=clock.now())
    assert restored.checkpoint().checkpoint_id == ckpt.checkpoint_id
    assert restored.request_checkpoint("", clock.now())[0].checkpoint_id == "ckpt-000002"


def test_a_worker_may_not_report_a_checkpoint_and_nothing_changes():
    clock = FakeClock()
    job, _ = training_job(clock)
    worker = job.register(Role.WORKER, "", clock.now())
    ckpt, _ = job.request_checkpoint("", clock.now())
    with pytest.raises(InvalidArgument):
        job.heartbeat(worker.member_id, worker.incarnation, clock.now(),
                      checkpoint=CheckpointReport(ckpt.checkpoint_id, 0, 0, "/w.pt"))
    assert job.checkpoint(ckpt.checkpoint_id).reports == {}


def test_no_checkpoint_before_the_layout_or_after_the_job_and_a_final_one_when_training_ends():
    clock = FakeClock()
    job = Job(SPEC, 10, PARAMS)
    with pytest.raises(NotReady) as not_ready:
        job.request_checkpoint("", clock.now())
    assert not_ready.value.retry_after_s == SPEC.heartbeat_interval_s / 2
    job, servers = training_job(clock)
    worker = job.register(Role.WORKER, "", clock.now())
    decision = job.lease(worker.member_id, worker.incarnation, clock.now())
    lease = decision.lease
    job.complete(
        worker.member_id, worker.incarnation, lease.epoch, lease.shard.index, 0.1, 10, clock.now(), lease.lease_id
    )
    assert job.state is JobState.EVALUATING
    final = job.checkpoint("ckpt-000001")
    assert final.final and final.target_version == NOW
    assert job.lease(worker.member_id, worker.incarnation, clock.now()).outcome is LeaseOutcome.EVALUATE
    job.report_evaluation(worker.member_id, worker.incarnation, EvaluationResult(0.9, 0.9, 0.1, 5, 1.0), clock.now())
    with pytest.raises(FailedPrecondition):
        job.request_checkpoint("", clock.now())
    # The order still stands after the job ended, so servers answer it before they exit.
    order = job.heartbeat(servers[0].member_id, servers[0].incarnation, clock.now()).checkpoint
    assert order.checkpoint_id == "ckpt-000001"
