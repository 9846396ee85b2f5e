"""Conversions between Lepton's tensor and evaluation dataclasses and the lepton.v1 messages;
the job spec and control-plane values convert in lepton.control_wire (re-exported here)."""

from __future__ import annotations

from typing import Any

from lepton.codec import TensorSpec, torch_dtype, wire_dtype
from lepton.control_wire import (  # noqa: F401  (re-exported)
    MODE_FROM_WIRE,
    MODE_TO_WIRE,
    TASK_FROM_WIRE,
    TASK_TO_WIRE,
    job_from_proto,
    job_to_proto,
    optimizer_kwargs,
)
from lepton.errors import InvalidArgument
from lepton.tasks import REGRESSION, Evaluation
from lepton.tensors import TensorKind
from lepton.v1 import common_pb2 as pb
from lepton.v1 import coordinator_pb2 as cpb

KIND_TO_WIRE = {
    TensorKind.PARAMETER: pb.TENSOR_KIND_PARAMETER,
    TensorKind.FROZEN: pb.TENSOR_KIND_FROZEN,
    TensorKind.BUFFER: pb.TENSOR_KIND_BUFFER,
}
KIND_FROM_WIRE = {v: k for k, v in KIND_TO_WIRE.items()}  # UNSPECIFIED: a parameter
def spec_to_proto(spec: TensorSpec) -> pb.TensorInfo:
    return pb.TensorInfo(
        name=spec.name,
        dtype=wire_dtype(spec.dtype),
        shape=list(spec.shape),
        parameter=spec.parameter,
        row_offset=spec.row_offset,
        parameter_shape=list(spec.parameter_shape),
        sparse=spec.sparse,
        kind=KIND_TO_WIRE[spec.kind],
    )


def spec_from_proto(msg: pb.TensorInfo) -> TensorSpec:
    return TensorSpec(
        msg.name,
        torch_dtype(msg.dtype),
        tuple(msg.shape),
        parameter=msg.parameter,
        row_offset=msg.row_offset,
        parameter_shape=tuple(msg.parameter_shape),
        sparse=msg.sparse,
        kind=KIND_FROM_WIRE.get(msg.kind, TensorKind.PARAMETER),
    )


def evaluation_to_fields(result: Evaluation) -> dict:
    """Keyword arguments of ReportEvaluationRequest and EvaluationResult (the same fields) for an
    evaluation; the task decides which of ``task_metrics`` is set."""
    fields: dict = dict(
        accuracy=result.accuracy or 0.0,
        macro_recall=result.macro_recall or 0.0,
        loss=result.loss,
        samples=result.samples,
        inference_samples_per_second=result.inference_samples_per_second,
    )
    if result.task == REGRESSION:
        fields["regression"] = cpb.RegressionMetrics(mse=result.mse, mae=result.mae, r2=result.r2)
    else:
        fields["classification"] = cpb.ClassificationMetrics(
            per_class_recall=list(result.per_class_recall),
            num_classes=len(result.confusion_matrix),
            confusion_matrix=[c for row in result.confusion_matrix for c in row],
        )
    return fields


def evaluation_from_proto(msg: cpb.ReportEvaluationRequest | cpb.EvaluationResult) -> Evaluation:
    """The evaluation either message carries; neither metrics set (senders before them): a
    classification result of accuracy and macro recall only. Raises InvalidArgument for a
    confusion matrix whose size is not num_classes squared."""
    common: dict[str, Any] = dict(
        loss=msg.loss, samples=msg.samples, inference_samples_per_second=msg.inference_samples_per_second
    )
    if msg.WhichOneof("task_metrics") == "regression":
        r = msg.regression
        return Evaluation(accuracy=None, macro_recall=None, task=REGRESSION, mse=r.mse, mae=r.mae, r2=r.r2, **common)
    c = msg.classification
    k = c.num_classes
    if len(c.confusion_matrix) != k * k:
        raise InvalidArgument(f"confusion_matrix has {len(c.confusion_matrix)} counts, not num_classes² = {k * k}")
    return Evaluation(
        accuracy=msg.accuracy,
        macro_recall=msg.macro_recall,
        per_class_recall=tuple(c.per_class_recall),
        confusion_matrix=tuple(tuple(c.confusion_matrix[i * k : (i + 1) * k]) for i in range(k)),
        **common,
    )


def validation_to_proto(row) -> cpb.ValidationRecord:  # type: ignore[no-untyped-def]
    """A ValidationRecord message for a recorded validation (coordinator/validation.py)."""
    return cpb.ValidationRecord(
        epoch=row.epoch,
        step=row.step,
        samples_trained=row.samples_trained,
        training_seconds=row.training_seconds,
        time_unix_s=row.time_unix_s,
        evaluation=cpb.EvaluationResult(**evaluation_to_fields(row.evaluation)),
        final=row.final,
    )


VALIDATION_METRICS = ("loss", "accuracy", "macro_recall", "mse", "mae", "r2")


def validation_row(msg: cpb.ValidationRecord) -> dict:
    """One validation as a plain row (reports, `lepton status`): when, and the task's metrics
    (the others None)."""
    ev = evaluation_from_proto(msg.evaluation)
    return {
        "epoch": msg.epoch,
        "step": msg.step,
        "samples_trained": msg.samples_trained,
        "training_seconds": round(msg.training_seconds, 3),
        "time_unix_s": msg.time_unix_s,
        "final": msg.final,
        "samples": ev.samples,
        **{name: getattr(ev, name) for name in VALIDATION_METRICS},
    }
