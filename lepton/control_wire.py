"""Conversions between the control plane's values (lepton.config JobSpec, lepton.domain) and the
lepton.v1 messages. Imports no torch, so operator commands that only talk to a coordinator stay light."""

from __future__ import annotations

from typing import cast

from google.protobuf import json_format, struct_pb2

from lepton.config import JobSpec
from lepton.domain import (
    CheckpointOrder,
    CheckpointReport,
    CheckpointTicket,
    HeartbeatReply,
    JobState,
    LeaseGrant,
    LeaseOutcome,
    MemberId,
    Role,
    ShardLease,
    WorkerView,
)
from lepton.errors import InvalidArgument
from lepton.v1 import common_pb2 as pb
from lepton.v1 import coordinator_pb2 as cpb

MODE_TO_WIRE = {
    "async": pb.CONSISTENCY_MODE_ASYNC,
    "sync": pb.CONSISTENCY_MODE_SYNC,
    "ssp": pb.CONSISTENCY_MODE_SSP,
}
MODE_FROM_WIRE = {v: k for k, v in MODE_TO_WIRE.items()}
TASK_TO_WIRE = {
    "auto": pb.TASK_UNSPECIFIED,
    "classification": pb.TASK_CLASSIFICATION,
    "regression": pb.TASK_REGRESSION,
}
TASK_FROM_WIRE = {v: k for k, v in TASK_TO_WIRE.items()}
COMPRESSION_TO_WIRE = {
    "none": pb.GRADIENT_COMPRESSION_NONE,
    "fp16": pb.GRADIENT_COMPRESSION_FP16,
    "bf16": pb.GRADIENT_COMPRESSION_BF16,
    "topk": pb.GRADIENT_COMPRESSION_TOPK,
    "sign": pb.GRADIENT_COMPRESSION_SIGN,
}
COMPRESSION_FROM_WIRE = {v: k for k, v in COMPRESSION_TO_WIRE.items()} | {pb.GRADIENT_COMPRESSION_UNSPECIFIED: "none"}


ROLE_TO_WIRE = {Role.PARAMETER_SERVER: pb.ROLE_PARAMETER_SERVER, Role.WORKER: pb.ROLE_WORKER}
ROLE_FROM_WIRE = {v: k for k, v in ROLE_TO_WIRE.items()}


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
        eval_every_epochs=spec.eval_every_epochs,
        early_stopping_metric=spec.early_stopping_metric,
        early_stopping_patience=spec.early_stopping_patience,
        feature_columns=list(spec.feature_columns),
        label_column=spec.label_column,
        device=spec.device,
        precision=spec.precision,
        clip_grad_norm=spec.clip_grad_norm,
        warmup_steps=spec.warmup_steps,
        accumulate=spec.accumulate,
        gradient_compression=COMPRESSION_TO_WIRE[spec.gradient_compression],
        topk_ratio=spec.topk_ratio,
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
    if msg.gradient_compression not in COMPRESSION_FROM_WIRE:
        raise InvalidArgument(f"gradient compression {msg.gradient_compression} is not served by this version")
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
        eval_every_epochs=msg.eval_every_epochs,
        early_stopping_metric=msg.early_stopping_metric,
        early_stopping_patience=msg.early_stopping_patience or JobSpec.early_stopping_patience,
        feature_columns=tuple(msg.feature_columns),
        label_column=msg.label_column or JobSpec.label_column,
        device=msg.device or "cpu",
        precision=msg.precision or JobSpec.precision,
        clip_grad_norm=msg.clip_grad_norm,
        warmup_steps=msg.warmup_steps,
        accumulate=msg.accumulate or 1,
        gradient_compression=COMPRESSION_FROM_WIRE[msg.gradient_compression],
        topk_ratio=msg.topk_ratio or JobSpec.topk_ratio,
    )


def member_ref(member: MemberId) -> pb.MemberRef:
    return pb.MemberRef(member_id=member.member_id, incarnation=member.incarnation)


def member_from_ref(ref: pb.MemberRef) -> MemberId:
    return MemberId(ref.member_id, ref.incarnation)


def job_state_from_wire(value: int) -> JobState:
    try:
        return JobState(value)
    except ValueError:
        raise InvalidArgument(f"job state {value} is not known to this version") from None


def report_to_proto(report: CheckpointReport) -> cpb.CheckpointReport:
    return cpb.CheckpointReport(
        checkpoint_id=report.checkpoint_id, target_version=report.target_version, version=report.version,
        path=report.path, missed=report.missed, error=report.error,
    )


def report_from_proto(msg: cpb.CheckpointReport) -> CheckpointReport:
    return CheckpointReport(msg.checkpoint_id, msg.target_version, msg.version, msg.path, msg.missed, msg.error)


def heartbeat_to_proto(reply: HeartbeatReply) -> cpb.HeartbeatResponse:
    msg = cpb.HeartbeatResponse(
        job_state=cast(cpb.JobState, reply.state.value),  # domain values are the wire numbers
        layout_version=reply.layout_version,
        roster_version=reply.roster_version,
        heartbeat_interval_s=reply.interval_s,
        workers=[
            cpb.WorkerMembership(member_id=w.member_id, incarnation=w.incarnation, alive=w.alive)
            for w in reply.workers
        ],
    )
    if reply.checkpoint is not None:
        msg.checkpoint.CopyFrom(
            cpb.CheckpointOrder(
                checkpoint_id=reply.checkpoint.checkpoint_id, target_version=reply.checkpoint.target_version
            )
        )
    return msg


def heartbeat_from_proto(msg: cpb.HeartbeatResponse) -> HeartbeatReply:
    """Raises InvalidArgument for a job state this version does not know."""
    order = msg.checkpoint if msg.HasField("checkpoint") and msg.checkpoint.checkpoint_id else None
    return HeartbeatReply(
        state=job_state_from_wire(msg.job_state),
        layout_version=msg.layout_version,
        workers=tuple(WorkerView(w.member_id, w.incarnation, w.alive) for w in msg.workers),
        roster_version=msg.roster_version,
        checkpoint=CheckpointOrder(order.checkpoint_id, order.target_version) if order is not None else None,
        interval_s=msg.heartbeat_interval_s if msg.heartbeat_interval_s > 0 else 0.0,  # NaN and negatives: none
    )


def lease_from_proto(msg: cpb.LeaseShardResponse) -> LeaseGrant:
    """An outcome this version does not know is taken as WAIT (ask again later)."""
    known = msg.outcome in LeaseOutcome._value2member_map_
    outcome = LeaseOutcome(msg.outcome) if known else LeaseOutcome.WAIT
    lease = None
    if outcome is LeaseOutcome.GRANTED:
        w = msg.lease
        lease = ShardLease(w.lease_id, w.epoch, w.shard, w.start, w.end, w.offset)
    return LeaseGrant(outcome, lease, msg.retry_after_s, msg.lease_timeout_s)


def ticket_from_proto(msg: cpb.RequestCheckpointResponse) -> CheckpointTicket:
    return CheckpointTicket(msg.checkpoint_id, msg.coalesced, msg.target_version)
