"""A parameter server whose optimizer failed: its pushes get FAILED_PRECONDITION with the reason,
and its ReportFailure ends the job; bad reports get precise statuses and change nothing."""

from __future__ import annotations

import grpc
import pytest
import torch

from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import parameter_server_pb2 as ppb
from ps_server.parameter_server import ParameterServer
from ps_server.roster import WorkerEntry
from ps_server.servicer import ParameterServerServicer

from .test_servicers import coordinator, current, push, rejected, unary  # noqa: F401 - fixture

__all__ = ["coordinator"]


def report(member: common.MemberRef, reason: str) -> cpb.ReportFailureRequest:
    return cpb.ReportFailureRequest(member=member, reason=reason)


def server_ref(servicer) -> common.MemberRef:
    layout = unary(servicer, "GetLayout", cpb.GetLayoutRequest())
    return common.MemberRef(member_id=layout.servers[0].member_id, incarnation=1)


@pytest.mark.parametrize(
    ("who", "reason", "code"),
    [
        ("ps", "", grpc.StatusCode.INVALID_ARGUMENT),
        ("ps", "x" * 2001, grpc.StatusCode.INVALID_ARGUMENT),
        ("worker", "boom", grpc.StatusCode.FAILED_PRECONDITION),
        ("nobody", "boom", grpc.StatusCode.NOT_FOUND),
        ("unissued-incarnation", "boom", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_a_bad_failure_report_gets_a_precise_status_and_changes_nothing(coordinator, who, reason, code):
    servicer, job, clock, worker = coordinator
    member = {
        "ps": server_ref(servicer),
        "worker": worker,
        "nobody": common.MemberRef(member_id="ps-9", incarnation=1),
        "unissued-incarnation": common.MemberRef(member_id=server_ref(servicer).member_id, incarnation=7),
    }[who]
    error = rejected(lambda: unary(servicer, "ReportFailure", report(member, reason)))
    assert error.code is code, error.details
    status = unary(servicer, "GetStatus", cpb.GetStatusRequest())
    assert status.state == cpb.JOB_STATE_TRAINING and status.failure == ""


def test_a_failure_report_of_a_parameter_server_fails_the_job_with_its_reason(coordinator):
    servicer, *_ = coordinator
    ps = server_ref(servicer)
    reply = unary(servicer, "ReportFailure", report(ps, "optimizer adam failed at update 3: RuntimeError: x"))
    assert reply.state == cpb.JOB_STATE_FAILED
    status = unary(servicer, "GetStatus", cpb.GetStatusRequest())
    assert status.state == cpb.JOB_STATE_FAILED
    assert status.failure == f"parameter server {ps.member_id}: optimizer adam failed at update 3: RuntimeError: x"


class RaisesOnStep(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("injected")


def test_pushes_to_a_server_whose_optimizer_failed_get_failed_precondition(monkeypatch):
    monkeypatch.setattr(torch.optim, "RaisesOnStep", RaisesOnStep, raising=False)
    node = ParameterServer("ps-0")
    node.load({"w": torch.ones(2, 3)}, "raisesonstep", 0.5, {}, "async", step_timeout_s=5.0)
    node.update_roster([WorkerEntry("worker-0", 2, True)])
    servicer = ParameterServerServicer(node)
    before = current(node).clone()
    for _ in range(2):  # the failing step, then a push refused without stepping
        error = rejected(lambda: unary(servicer, "Push", push(("worker-0", 2), {"w": torch.ones(2, 3)})))
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert "optimizer raisesonstep failed at update 1: RuntimeError: injected" in error.details
    assert node.failure and node.status().version == 0
    assert torch.equal(current(node), before)
    status = unary(servicer, "GetServerStatus", ppb.GetServerStatusRequest())
    assert status.version == 0
