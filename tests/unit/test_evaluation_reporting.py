"""A task's metrics on their way out: the wire codec, the coordinator's check and event, `lepton
status` and `lepton up`'s report."""

from __future__ import annotations

import math

import pytest

from coordinator.events import EventKind, EventLog
from coordinator.job import Job, JobState, LeaseOutcome
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import FailedPrecondition, InvalidArgument
from lepton.ops.report import evaluation_report
from lepton.ops.status import render
from lepton.status import status_dict
from lepton.tasks import Evaluation
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.wire import evaluation_from_proto, evaluation_to_fields, job_from_proto, job_to_proto
from worker.trainer import divergence

from .test_job import INITIAL, SAMPLES, SPEC, start_training, train_shard, worker

CLASSIFIED = Evaluation(
    accuracy=0.75, macro_recall=0.5, loss=0.6, samples=4, inference_samples_per_second=10.0,
    per_class_recall=(1.0, 0.0, math.nan), confusion_matrix=((3, 0, 0), (1, 0, 0), (0, 0, 0)),
)  # fmt: skip
REGRESSED = Evaluation(
    accuracy=None, macro_recall=None, loss=0.45, samples=89, inference_samples_per_second=10.0,
    task="regression", mse=0.45, mae=0.55, r2=0.6,
)  # fmt: skip


def same(a: Evaluation, b: Evaluation) -> bool:
    """Equality with NaN equal to NaN (an absent class's recall)."""
    nan = -1.0

    def fix(e: Evaluation) -> Evaluation:
        recall = tuple(nan if r != r else r for r in e.per_class_recall)
        return e.__class__(**{**e.__dict__, "per_class_recall": recall})

    return fix(a) == fix(b)


@pytest.mark.parametrize("result", [CLASSIFIED, REGRESSED])
@pytest.mark.parametrize("message", [cpb.ReportEvaluationRequest, cpb.EvaluationResult])
def test_an_evaluation_round_trips_through_both_messages(result, message):
    msg = message.FromString(message(**evaluation_to_fields(result)).SerializeToString())
    assert msg.WhichOneof("task_metrics") == result.task
    assert same(evaluation_from_proto(msg), result)


def test_an_evaluation_from_a_sender_before_task_metrics_is_a_classification_result():
    msg = cpb.ReportEvaluationRequest(accuracy=0.9, macro_recall=0.8, loss=0.3, samples=5)
    assert evaluation_from_proto(msg) == Evaluation(0.9, 0.8, 0.3, 5, 0.0)


def test_a_confusion_matrix_of_the_wrong_size_is_invalid_argument():
    msg = cpb.ReportEvaluationRequest(
        classification=cpb.ClassificationMetrics(num_classes=2, confusion_matrix=[1, 2, 3])
    )
    with pytest.raises(InvalidArgument, match="num_classes"):
        evaluation_from_proto(msg)


def test_loss_and_task_travel_in_the_job_spec_and_default_for_old_senders():
    spec = JobSpec(dataset="diabetes", loss="pkg.mod:huber", task="regression")
    assert job_from_proto(common.JobSpec.FromString(job_to_proto(spec).SerializeToString())) == spec
    old = job_to_proto(JobSpec())
    old.ClearField("loss")
    old.ClearField("task")
    assert (job_from_proto(old).loss, job_from_proto(old).task) == ("cross_entropy", "auto")
    old.task = 99  # a task from a newer sender
    with pytest.raises(InvalidArgument, match="task 99"):
        job_from_proto(old)


def evaluating_job(clock: FakeClock) -> tuple[Job, object]:
    job = Job(SPEC, SAMPLES, INITIAL, events=EventLog(wall_clock=lambda: 0.0))
    start_training(job, clock)
    w = worker(job, clock)
    for _ in range(6):
        train_shard(job, clock, w)
    assert job.lease(w.member_id, w.incarnation, clock.now()).outcome is LeaseOutcome.EVALUATE
    return job, w


def test_a_regression_evaluation_ends_the_job_with_its_metrics_in_the_event_and_status():
    clock = FakeClock()
    job, w = evaluating_job(clock)
    job.report_evaluation(w.member_id, w.incarnation, REGRESSED, clock.now())
    assert job.state is JobState.SUCCEEDED
    assert job.status(clock.now()).evaluation == REGRESSED
    [event] = [e for e in job.events.after(0) if e.kind is EventKind.EVALUATED]
    assert "mse 0.4500, mae 0.5500, r2 0.6000, loss 0.4500 on 89 samples" in event.message


@pytest.mark.parametrize(
    "bad",
    [
        Evaluation(None, None, 0.4, 9, 1.0, task="regression", mse=-0.1, mae=0.2, r2=0.5),
        Evaluation(None, None, 0.4, 9, 1.0, task="regression", mse=0.1, mae=0.2, r2=1.5),
        Evaluation(0.5, 0.5, 0.4, 9, 1.0, per_class_recall=(1.2,)),
        Evaluation(0.5, 0.5, 0.4, 9, 1.0, confusion_matrix=((1, 2),)),
    ],
)
def test_impossible_metrics_are_refused_and_change_nothing(bad):
    clock = FakeClock()
    job, w = evaluating_job(clock)
    with pytest.raises(InvalidArgument):
        job.report_evaluation(w.member_id, w.incarnation, bad, clock.now())
    assert job.state is JobState.EVALUATING


DIVERGED = "the model diverged: evaluation loss is nan"


def test_the_evaluator_reports_a_diverged_model_and_the_job_fails_with_its_reason():
    clock = FakeClock()
    job, w = evaluating_job(clock)
    other = worker(job, clock)
    with pytest.raises(FailedPrecondition, match="not a parameter server"):
        job.report_failure(other.member_id, other.incarnation, DIVERGED, clock.now())  # not asked to evaluate
    assert job.state is JobState.EVALUATING and job.status(clock.now()).failure == ""
    assert job.report_failure(w.member_id, w.incarnation, DIVERGED, clock.now()) is JobState.FAILED
    assert job.status(clock.now()).failure == f"worker {w.member_id}: {DIVERGED}"
    changed = [e for e in job.events.after(0) if e.kind is EventKind.JOB_STATE_CHANGED]
    assert DIVERGED in changed[-1].message
    assert job.lease(other.member_id, other.incarnation, clock.now()).outcome is LeaseOutcome.JOB_DONE


def test_a_worker_reports_no_failure_while_the_job_trains():
    clock = FakeClock()
    job = Job(SPEC, SAMPLES, INITIAL, events=EventLog(wall_clock=lambda: 0.0))
    start_training(job, clock)
    w = worker(job, clock)
    with pytest.raises(FailedPrecondition):
        job.report_failure(w.member_id, w.incarnation, DIVERGED, clock.now())
    assert job.state is JobState.TRAINING


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (CLASSIFIED, None),
        (REGRESSED, None),
        (Evaluation(0.5, 0.5, math.nan, 9, 1.0), DIVERGED),
        (Evaluation(0.5, 0.5, math.inf, 9, 1.0), "the model diverged: evaluation loss is inf"),
        (
            Evaluation(None, None, 0.4, 9, 1.0, task="regression", mse=math.inf, mae=0.2, r2=0.5),
            "the model diverged: evaluation mse is inf",
        ),
    ],
)
def test_the_worker_names_a_non_finite_evaluation_as_divergence(result, reason):
    assert divergence(result) == reason


def status_with(result: Evaluation) -> cpb.GetStatusResponse:
    return cpb.GetStatusResponse(
        job=job_to_proto(JobSpec()),
        has_evaluation=True,
        evaluation=cpb.EvaluationResult(**evaluation_to_fields(result)),
    )


def test_status_shows_regression_metrics_and_json_carries_only_them():
    status = status_with(REGRESSED)
    assert "test       mse 0.4500, mae 0.5500, r2 0.6000, loss 0.4500" in render(status)
    assert "accuracy" not in render(status)
    evaluation = status_dict(status)["evaluation"]
    assert evaluation["regression"] == {"mse": 0.45, "mae": 0.55, "r2": 0.6} and "classification" not in evaluation


def test_status_shows_per_class_recall_and_the_confusion_matrix():
    text = render(status_with(CLASSIFIED))
    assert "test       accuracy 0.7500, macro recall 0.5000, loss 0.6000" in text
    assert "  recall   1.00 0.00 -" in text
    assert "  confusion 3 0 0\n            1 0 0\n            0 0 0" in text
    evaluation = status_dict(status_with(CLASSIFIED))["evaluation"]
    assert evaluation["classification"]["confusion_matrix"] == [3, 0, 0, 1, 0, 0, 0, 0, 0]
    assert evaluation["classification"]["per_class_recall"] == [1.0, 0.0, None]


def test_the_up_report_keeps_classification_keys_and_adds_the_task_metrics():
    report = evaluation_report(CLASSIFIED)
    assert (report["task"], report["test_accuracy"], report["test_macro_recall"]) == ("classification", 0.75, 0.5)
    assert report["test_per_class_recall"] == [1.0, 0.0, None]
    assert report["test_confusion_matrix"] == [[3, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert report["test_mse"] is None
    report = evaluation_report(REGRESSED)
    assert (report["test_mse"], report["test_mae"], report["test_r2"], report["test_loss"]) == (0.45, 0.55, 0.6, 0.45)
    assert report["test_accuracy"] is None and report["test_confusion_matrix"] is None
