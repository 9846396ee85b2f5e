"""Conversions between Lepton's dataclasses and the lepton.v1 messages that every role shares."""

from __future__ import annotations

from google.protobuf import json_format, struct_pb2

from lepton.codec import TensorSpec, torch_dtype, wire_dtype
from lepton.config import JobSpec
from lepton.errors import InvalidArgument
from lepton.tensors import TensorKind
from lepton.tasks import REGRESSION, Evaluation
from lepton.v1 import common_pb2 as pb
from lepton.v1 import coordinator_pb2 as cpb

MODE_TO_WIRE = {
    "async": pb.CONSISTENCY_MODE_ASYNC,
    "sync": pb.CONSISTENCY_MODE_SYNC,
    "ssp": pb.CONSISTENCY_MODE_SSP,
}
MODE_FROM_WIRE = {v: k for k, v in MODE_TO_WIRE.items()}
KIND_TO_WIRE = {
    TensorKind.PARAMETER: pb.TENSOR_KIND_PARAMETER,
    TensorKind.FROZEN: pb.TENSOR_KIND_FROZEN,
    TensorKind.BUFFER: pb.TENSOR_KIND_BUFFER,
}
KIND_FROM_WIRE = {v: k for k, v in KIND_TO_WIRE.items()}  # UNSPECIFIED: a parameter
TASK_TO_WIRE = {
    "auto": pb.TASK_UNSPECIFIED,
    "classification": pb.TASK_CLASSIFICATION,
    "regression": pb.TASK_REGRESSION,
}
TASK_FROM_WIRE = {v: k for k, v in TASK_TO_WIRE.items()}


def job_to_proto(spec: JobSpec) -> pb.JobSpec:
    kwargs = struct_pb2.Struct()
    kwargs.update(dict(spec.optimizer_kwargs))
    schedule_kwargs = struct_pb2.Struct()
    schedule_kwargs.update(dict(spec.lr_schedule_kwargs))
    return pb.JobSpec(
        dataset=spec.dataset,
        model=spec.model,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        optimizer=pb.OptimizerSpec(name=spec.optimizer, learning_rate=spec.lr, kwargs=kwargs),
        mode=MODE_TO_WIRE[spec.mode],
        shards_per_epoch=spec.shards_per_epoch,
        heartbeat_interval_s=spec.heartbeat_interval_s,
        heartbeat_timeout_s=spec.heartbeat_timeout_s,
        parameter_servers=spec.parameter_servers,
        seed=spec.seed,
        checkpoint_every_steps=spec.checkpoint_every_steps,
        lr_schedule=spec.lr_schedule,
        lr_schedule_kwargs=schedule_kwargs,
        staleness=spec.staleness,
        lease_timeout_s=spec.lease_timeout_s,
        loss=spec.loss,
        task=TASK_TO_WIRE[spec.task],
        async_lr_scaling=spec.async_lr_scaling,
    )


def _struct_kwargs(struct: struct_pb2.Struct) -> dict:
    kwargs = json_format.MessageToDict(struct)
    # Struct numbers are doubles; integral values are what torch expects for ints.
    return {k: int(v) if isinstance(v, float) and v.is_integer() and k != "lr" else v for k, v in kwargs.items()}


def optimizer_kwargs(msg: pb.OptimizerSpec) -> dict:
    return _struct_kwargs(msg.kwargs)


def job_from_proto(msg: pb.JobSpec) -> JobSpec:
    if msg.mode not in MODE_FROM_WIRE:
        raise InvalidArgument(f"consistency mode {msg.mode} is not served by this version")
    if msg.task not in TASK_FROM_WIRE:
        raise InvalidArgument(f"task {msg.task} is not served by this version")
    return JobSpec(
        dataset=msg.dataset,
        model=msg.model,
        epochs=msg.epochs,
        batch_size=msg.batch_size,
        optimizer=msg.optimizer.name,
        lr=msg.optimizer.learning_rate,
        optimizer_kwargs=optimizer_kwargs(msg.optimizer),
        mode=MODE_FROM_WIRE[msg.mode],
        shards_per_epoch=msg.shards_per_epoch,
        heartbeat_interval_s=msg.heartbeat_interval_s,
        heartbeat_timeout_s=msg.heartbeat_timeout_s,
        parameter_servers=msg.parameter_servers,
        seed=msg.seed,
        checkpoint_every_steps=msg.checkpoint_every_steps,
        lr_schedule=msg.lr_schedule or "constant",
        lr_schedule_kwargs=_struct_kwargs(msg.lr_schedule_kwargs),
        staleness=msg.staleness,
        lease_timeout_s=msg.lease_timeout_s or JobSpec.lease_timeout_s,
        loss=msg.loss or JobSpec.loss,
        task=TASK_FROM_WIRE[msg.task],
        async_lr_scaling=msg.async_lr_scaling or JobSpec.async_lr_scaling,
    )


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
    common = dict(loss=msg.loss, samples=msg.samples, inference_samples_per_second=msg.inference_samples_per_second)
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
