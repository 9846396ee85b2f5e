"""Validation during training (JobSpec.eval_every_epochs) and early stopping, driven on the Job
with a fake clock: no lease while a validation is due, one row per validation, the final
evaluation as the last epoch's row, the evaluator's death, restarts, and the early-stopping rule."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.events import EventKind, EventLog
from coordinator.job import Job, JobState, LeaseOutcome
from coordinator.metrics import JobCollector
from coordinator.servicer import event_to_proto, status_to_proto
from coordinator.statedb import JobStore, SqliteJobStore
from coordinator.validation import ValidationRecord, early_stop_reason
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import ConfigError, FailedPrecondition, InvalidArgument
from lepton.tasks import REGRESSION, Evaluation
from lepton.wire import validation_row
from tests.unit.test_job import INITIAL, RESULT, SAMPLES, SPEC, beat, kinds, start_training, worker

SPEC3 = SPEC.replace(epochs=3, eval_every_epochs=1)


def result(accuracy: float, loss: float = 0.5) -> Evaluation:
    return dataclasses.replace(RESULT, accuracy=accuracy, loss=loss)


def finish_epoch(job: Job, clock: FakeClock, w) -> None:
    """``w`` trains every pending shard of the current epoch."""
    for _ in range(job.spec.shards_per_epoch):
        decision = job.lease(w.member_id, w.incarnation, clock.now())
        assert decision.outcome is LeaseOutcome.GRANTED, decision
        lease = decision.lease
        job.complete(w.member_id, w.incarnation, lease.epoch, lease.shard.index, 1.0, 10, clock.now(), lease.lease_id)


def validate(job: Job, clock: FakeClock, w, evaluation: Evaluation = RESULT, version: int = 0) -> None:
    assert job.lease(w.member_id, w.incarnation, clock.now()).outcome is LeaseOutcome.EVALUATE
    job.report_evaluation(w.member_id, w.incarnation, evaluation, clock.now(), version)


def make(spec: JobSpec, store: JobStore | None = None) -> Job:
    return Job(spec, SAMPLES, INITIAL, events=EventLog(wall_clock=lambda: 0.0) if store is None else None, store=store)


def test_every_epoch_is_validated_once_and_the_final_evaluation_is_the_last_row():
    clock, job = FakeClock(), make(SPEC3)
    start_training(job, clock)
    w = worker(job, clock)
    for epoch in range(2):
        finish_epoch(job, clock, w)
        status = job.status(clock.now())
        assert status.state is JobState.TRAINING and status.validating
        validate(job, clock, w, result(0.5 + 0.1 * epoch), version=10 * (epoch + 1))
    finish_epoch(job, clock, w)
    assert job.state is JobState.EVALUATING
    validate(job, clock, w, result(0.9), version=30)
    status = job.status(clock.now())
    assert status.state is JobState.SUCCEEDED and not status.validating
    assert [(r.epoch, r.final) for r in status.validation] == [(0, False), (1, False), (2, True)]
    assert [r.evaluation.accuracy for r in status.validation] == [0.5, 0.6, 0.9]
    assert [r.samples_trained for r in status.validation] == [30, 60, 90]
    assert [r.step for r in status.validation] == [10, 20, 30]
    events = kinds(job, EventKind.VALIDATED)
    assert [e.epoch for e in events] == [0, 1]  # the final one is EVALUATED
    wire = event_to_proto(events[1])
    assert wire.validation.epoch == 1 and wire.validation.evaluation.accuracy == pytest.approx(0.6)
    rows = [validation_row(r) for r in status_to_proto(status).validation]
    assert [r["accuracy"] for r in rows] == pytest.approx([0.5, 0.6, 0.9]) and rows[2]["final"]


def test_no_lease_is_granted_while_a_validation_is_due_and_only_the_evaluator_may_report():
    clock, job = FakeClock(), make(SPEC3)
    start_training(job, clock)
    a, b = worker(job, clock), worker(job, clock)
    finish_epoch(job, clock, a)
    assert job.lease(a.member_id, a.incarnation, clock.now()).outcome is LeaseOutcome.EVALUATE
    assert job.lease(b.member_id, b.incarnation, clock.now()).outcome is LeaseOutcome.WAIT
    assert job.status(clock.now()).shards_leased == 0
    with pytest.raises(FailedPrecondition):
        job.report_evaluation(b.member_id, b.incarnation, RESULT, clock.now())
    with pytest.raises(InvalidArgument):
        job.report_evaluation(a.member_id, a.incarnation, RESULT, clock.now(), -1)
    assert job.status(clock.now()).validation == ()
    job.report_evaluation(a.member_id, a.incarnation, RESULT, clock.now())
    assert job.lease(b.member_id, b.incarnation, clock.now()).outcome is LeaseOutcome.GRANTED
    with pytest.raises(FailedPrecondition):  # the validation is over: a second report is refused
        job.report_evaluation(a.member_id, a.incarnation, RESULT, clock.now())
    assert len(job.status(clock.now()).validation) == 1


def test_a_new_evaluator_validates_when_the_first_one_dies():
    clock, job = FakeClock(), make(SPEC3)
    servers = start_training(job, clock)
    a, b = worker(job, clock), worker(job, clock)
    finish_epoch(job, clock, a)
    assert job.lease(a.member_id, a.incarnation, clock.now()).outcome is LeaseOutcome.EVALUATE
    for _ in range(8):  # a falls silent past the heartbeat timeout
        clock.advance(0.5)
        beat(job, clock, [*servers, b])
        job.tick(clock.now())
    validate(job, clock, b)
    assert [r.epoch for r in job.status(clock.now()).validation] == [0]


def test_every_k_epochs_validates_after_epochs_k_2k_and_the_final_one():
    clock, job = FakeClock(), make(SPEC.replace(epochs=5, eval_every_epochs=2))
    start_training(job, clock)
    w = worker(job, clock)
    for epoch in range(5):
        finish_epoch(job, clock, w)
        if epoch in (1, 3):
            validate(job, clock, w)
    validate(job, clock, w)
    assert [(r.epoch, r.final) for r in job.status(clock.now()).validation] == [(1, False), (3, False), (4, True)]


def test_without_eval_every_epochs_there_is_no_validation():
    clock, job = FakeClock(), make(SPEC)
    start_training(job, clock)
    w = worker(job, clock)
    finish_epoch(job, clock, w)
    assert job.lease(w.member_id, w.incarnation, clock.now()).outcome is LeaseOutcome.GRANTED
    status = job.status(clock.now())
    assert status.validation == () and not status.validating


def test_early_stopping_ends_training_after_patience_validations_without_improvement():
    spec = SPEC.replace(epochs=10, eval_every_epochs=1, early_stopping_metric="accuracy", early_stopping_patience=2)
    clock, job = FakeClock(), make(spec)
    start_training(job, clock)
    w = worker(job, clock)
    for accuracy in (0.5, 0.7, 0.7, 0.65):
        finish_epoch(job, clock, w)
        validate(job, clock, w, result(accuracy))
    status = job.status(clock.now())
    assert status.state is JobState.EVALUATING
    assert "accuracy has not improved on its best 0.7000 (epoch 1) for 2" in status.stopped_early
    validate(job, clock, w, result(0.65))  # the final evaluation of the same model adds no row
    status = job.status(clock.now())
    assert status.state is JobState.SUCCEEDED and [r.epoch for r in status.validation] == [0, 1, 2, 3]
    assert status.shard_completions == 4 * spec.shards_per_epoch


def test_early_stopping_on_a_metric_the_task_lacks_fails_the_job():
    spec = SPEC.replace(epochs=3, eval_every_epochs=1, early_stopping_metric="r2")
    clock, job = FakeClock(), make(spec)
    start_training(job, clock)
    w = worker(job, clock)
    finish_epoch(job, clock, w)
    validate(job, clock, w)
    status = job.status(clock.now())
    assert status.state is JobState.FAILED and "'r2' is not a metric of a classification job" in status.failure


def row(epoch: int, **metrics: float) -> ValidationRecord:
    ev = Evaluation(accuracy=None, macro_recall=None, loss=1.0, samples=1, inference_samples_per_second=1.0,
                    task=REGRESSION, mse=1.0, mae=1.0, r2=0.0)
    return ValidationRecord(epoch, 0, 0, 0.0, 0.0, dataclasses.replace(ev, **metrics))


def test_early_stop_rule_knows_which_way_each_metric_improves():
    spec = SPEC.replace(eval_every_epochs=1, early_stopping_metric="mse", early_stopping_patience=1)
    assert early_stop_reason(spec, [row(0, mse=2.0), row(1, mse=1.0)]) is None
    assert early_stop_reason(spec, [row(0, mse=1.0), row(1, mse=1.0)]) is not None  # a tie is no improvement
    r2 = spec.replace(early_stopping_metric="r2", early_stopping_patience=2)
    assert early_stop_reason(r2, [row(0, r2=0.1), row(1, r2=0.0), row(2, r2=0.2)]) is None
    assert early_stop_reason(r2, [row(0, r2=0.3), row(1, r2=0.0), row(2, r2=0.2)]) is not None


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"eval_every_epochs": -1}, "eval_every_epochs must be >= 0"),
        ({"eval_every_epochs": 1, "early_stopping_metric": "f1"}, "early_stopping_metric must be one of"),
        ({"early_stopping_metric": "loss"}, "needs eval_every_epochs >= 1"),
        ({"early_stopping_patience": 0}, "early_stopping_patience must be >= 1"),
    ],
)
def test_bad_validation_settings_are_refused(changes, problem):
    with pytest.raises(ConfigError, match=problem):
        SPEC.replace(**changes)


def test_the_history_and_a_pending_validation_survive_a_restart(tmp_path):
    clock = FakeClock()
    store = SqliteJobStore(tmp_path / "state")
    job = make(SPEC3, store)
    start_training(job, clock)
    w = worker(job, clock)
    finish_epoch(job, clock, w)
    validate(job, clock, w, result(0.5))
    finish_epoch(job, clock, w)  # epoch 1's validation is due
    store.close()
    again = make(SPEC3, SqliteJobStore(tmp_path / "state"))
    status = again.status(clock.now())
    assert status.validating and [r.evaluation.accuracy for r in status.validation] == [0.5]
    w2 = again.register(w.role, "", clock.now(), member_id=w.member_id)
    validate(again, clock, w2, result(0.6))
    assert [r.epoch for r in again.status(clock.now()).validation] == [0, 1]


def test_prometheus_shows_the_newest_validation():
    clock, job = FakeClock(), make(SPEC3)
    start_training(job, clock)
    w = worker(job, clock)
    finish_epoch(job, clock, w)
    validate(job, clock, w, result(0.75))
    families = {f.name: f for f in JobCollector(job, clock.now).collect()}
    assert families["lepton_validations"].samples[0].value == 1
    metric = {s.labels["metric"]: s.value for s in families["lepton_validation_metric"].samples}
    assert metric["accuracy"] == 0.75 and "r2" not in metric
