"""JobSpec to the wire and back: every field survives, and what older senders leave out has a
meaning."""

from __future__ import annotations

import pytest

from lepton.config import JobSpec
from lepton.v1 import common_pb2 as pb
from lepton.wire import job_from_proto, job_to_proto


def round_trip(spec: JobSpec) -> JobSpec:
    return job_from_proto(pb.JobSpec.FromString(job_to_proto(spec).SerializeToString()))


@pytest.mark.parametrize(
    "spec",
    [
        JobSpec(),
        JobSpec(mode="sync", optimizer="sgd", lr=0.1, optimizer_kwargs={"momentum": 0.9, "nesterov": True}),
        JobSpec(lr_schedule="step", lr_schedule_kwargs={"step_size": 30, "gamma": 0.5}),
        JobSpec(lr_schedule="cosine", lr_schedule_kwargs={"t_max": 1000, "eta_min": 0.0005}),
        JobSpec(mode="ssp", staleness=3),
        JobSpec(async_lr_scaling="none"),
    ],
    ids=["defaults", "sync-sgd", "step-schedule", "cosine-schedule", "ssp", "no-async-lr-scaling"],
)
def test_a_job_spec_survives_the_wire_unchanged(spec):
    assert round_trip(spec) == spec


def test_schedule_counts_come_back_as_integers():
    spec = round_trip(JobSpec(lr_schedule="step", lr_schedule_kwargs={"step_size": 30}))
    assert type(spec.lr_schedule_kwargs["step_size"]) is int


def test_a_job_spec_without_a_schedule_from_an_older_sender_means_a_constant_rate():
    msg = job_to_proto(JobSpec())
    msg.ClearField("lr_schedule")
    msg.ClearField("lr_schedule_kwargs")
    spec = job_from_proto(msg)
    assert spec.lr_schedule == "constant" and dict(spec.lr_schedule_kwargs) == {}


def test_a_job_spec_from_a_sender_before_async_lr_scaling_means_the_staleness_rule():
    msg = job_to_proto(JobSpec(async_lr_scaling="none"))
    msg.ClearField("async_lr_scaling")
    assert job_from_proto(msg).async_lr_scaling == "staleness"
