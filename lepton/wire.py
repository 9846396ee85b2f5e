"""Conversions between Lepton's dataclasses and the lepton.v1 messages that every role shares."""

from __future__ import annotations

from google.protobuf import json_format, struct_pb2

from lepton.codec import TensorSpec, torch_dtype, wire_dtype
from lepton.config import JobSpec
from lepton.errors import InvalidArgument
from lepton.v1 import common_pb2 as pb

MODE_TO_WIRE = {
    "async": pb.CONSISTENCY_MODE_ASYNC,
    "sync": pb.CONSISTENCY_MODE_SYNC,
    "ssp": pb.CONSISTENCY_MODE_SSP,
}
MODE_FROM_WIRE = {v: k for k, v in MODE_TO_WIRE.items()}


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
    )
