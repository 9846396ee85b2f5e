"""Servicer methods called directly with a small fake context, wrapped exactly as the server's
interceptor wraps them, so each domain error surfaces as the status a client would see."""

from __future__ import annotations

import grpc
import pytest
import torch

from coordinator.job import Job
from coordinator.membership import Role
from coordinator.servicer import CoordinatorServicer
from lepton import codec
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.rpc import FENCED_MARKER, guard_stream, guard_unary
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import parameter_server_pb2 as ppb
from ps_server.parameter_server import ParameterServer
from ps_server.roster import WorkerEntry
from ps_server.servicer import ParameterServerServicer


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing = dict(trailing)


class FakeContext:
    def __init__(self, remaining_s: float | None = 1.0) -> None:
        self._remaining = remaining_s
        self._code = None
        self._trailing: tuple = ()

    def set_trailing_metadata(self, metadata):
        self._trailing = tuple(metadata)

    def abort(self, code, details):
        self._code = code
        raise Aborted(code, details, self._trailing)

    def code(self):
        return self._code

    def time_remaining(self):
        return self._remaining

    def is_active(self):
        return True


def unary(servicer, method: str, request):
    return guard_unary(method, getattr(servicer, method))(request, FakeContext())


def streaming(servicer, method: str, request):
    return list(guard_stream(method, getattr(servicer, method))(request, FakeContext()))


def rejected(fn) -> Aborted:
    with pytest.raises(Aborted) as info:
        fn()
    return info.value


# --- coordinator -------------------------------------------------------------------------------

SPEC = JobSpec(epochs=2, shards_per_epoch=4, parameter_servers=1, heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0)


@pytest.fixture
def coordinator():
    clock = FakeClock()
    job = Job(SPEC, 100, {"w": torch.ones(2, 2), "b": torch.zeros(2)})
    servicer = CoordinatorServicer(job, clock.now)
    ps = unary(
        servicer, "RegisterMember", cpb.RegisterMemberRequest(role=common.ROLE_PARAMETER_SERVER, address="127.0.0.1:1")
    )
    unary(servicer, "ReportReady", cpb.ReportReadyRequest(member=ps.member, layout_version=1))
    worker = unary(servicer, "RegisterMember", cpb.RegisterMemberRequest(role=common.ROLE_WORKER)).member
    return servicer, job, clock, worker


def test_register_without_role_is_invalid_argument(coordinator):
    servicer, *_ = coordinator
    error = rejected(lambda: unary(servicer, "RegisterMember", cpb.RegisterMemberRequest()))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT and "role" in error.details


def test_heartbeat_of_unknown_member_is_not_found(coordinator):
    servicer, *_ = coordinator
    ref = common.MemberRef(member_id="worker-99", incarnation=1)
    error = rejected(lambda: unary(servicer, "Heartbeat", cpb.HeartbeatRequest(member=ref)))
    assert error.code is grpc.StatusCode.NOT_FOUND


def test_member_declared_dead_is_fenced_with_failed_precondition(coordinator):
    servicer, job, clock, worker = coordinator
    lease = unary(servicer, "LeaseShard", cpb.LeaseShardRequest(member=worker))
    assert lease.outcome == cpb.LEASE_OUTCOME_GRANTED
    clock.advance(SPEC.heartbeat_timeout_s + 0.1)
    job.tick(clock.now())
    for method, request in [
        ("Heartbeat", cpb.HeartbeatRequest(member=worker)),
        ("ReportProgress", cpb.ReportProgressRequest(member=worker, epoch=0, shard=lease.lease.shard, offset=1)),
        ("CompleteShard", cpb.CompleteShardRequest(member=worker, epoch=0, shard=lease.lease.shard)),
    ]:
        error = rejected(lambda method=method, request=request: unary(servicer, method, request))
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert error.details.startswith(FENCED_MARKER)
    assert job.status(clock.now()).shard_completions == 0
    assert job.status(clock.now()).reassignments == 1


def test_unknown_shard_is_not_found(coordinator):
    servicer, _, _, worker = coordinator
    error = rejected(
        lambda: unary(servicer, "ReportProgress", cpb.ReportProgressRequest(member=worker, epoch=0, shard=42, offset=1))
    )
    assert error.code is grpc.StatusCode.NOT_FOUND and "42" in error.details


def test_second_completion_of_a_shard_is_rejected_and_counted(coordinator):
    servicer, job, clock, worker = coordinator
    lease = unary(servicer, "LeaseShard", cpb.LeaseShardRequest(member=worker)).lease
    done = cpb.CompleteShardRequest(member=worker, epoch=lease.epoch, shard=lease.shard)
    unary(servicer, "CompleteShard", done)
    error = rejected(lambda: unary(servicer, "CompleteShard", done))
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION and "already completed" in error.details
    status = unary(servicer, "GetStatus", cpb.GetStatusRequest())
    assert status.shard_completions == 1
    assert status.duplicate_completions_rejected == 1


def test_negative_progress_offset_is_invalid_argument(coordinator):
    servicer, _, _, worker = coordinator
    lease = unary(servicer, "LeaseShard", cpb.LeaseShardRequest(member=worker)).lease
    request = cpb.ReportProgressRequest(member=worker, epoch=lease.epoch, shard=lease.shard, offset=-1)
    error = rejected(lambda: unary(servicer, "ReportProgress", request))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT


def test_assignment_and_layout_before_the_layout_are_unavailable_with_a_retry_delay():
    clock = FakeClock()
    job = Job(SPEC.replace(parameter_servers=2), 100, {"w": torch.ones(2)})
    servicer = CoordinatorServicer(job, clock.now)
    ps = unary(servicer, "RegisterMember", cpb.RegisterMemberRequest(role=common.ROLE_PARAMETER_SERVER, address="h:1"))
    error = rejected(lambda: streaming(servicer, "GetAssignment", cpb.GetAssignmentRequest(member=ps.member)))
    assert error.code is grpc.StatusCode.UNAVAILABLE and "1 more" in error.details
    assert error.trailing == {"lepton-retry-after-ms": "500"}  # heartbeat_interval_s / 2
    error = rejected(lambda: unary(servicer, "GetLayout", cpb.GetLayoutRequest()))
    assert error.code is grpc.StatusCode.UNAVAILABLE and error.trailing == {"lepton-retry-after-ms": "500"}


def test_assignment_streams_the_servers_initial_tensors(coordinator):
    servicer, job, *_ = coordinator
    ps = next(m for m in job.status(0).members if m.member.role is Role.PARAMETER_SERVER).member
    ref = common.MemberRef(member_id=ps.member_id, incarnation=ps.incarnation)
    messages = streaming(servicer, "GetAssignment", cpb.GetAssignmentRequest(member=ref))
    tensors = codec.from_wire([c for m in messages for c in m.chunks])
    assert torch.equal(tensors["w"], torch.ones(2, 2)) and torch.equal(tensors["b"], torch.zeros(2))


# --- parameter server --------------------------------------------------------------------------


@pytest.fixture
def ps():
    node = ParameterServer("ps-0")
    node.load({"w": torch.ones(2, 3)}, "sgd", 0.5, {}, "async", step_timeout_s=5.0)
    node.update_roster([WorkerEntry("worker-0", 2, True), WorkerEntry("worker-1", 1, False)])
    return ParameterServerServicer(node), node


def push(member: tuple[str, int], grads: dict, base_version: int = 0, samples: int = 1, mutate=None):
    header = ppb.PushHeader(
        member=common.MemberRef(member_id=member[0], incarnation=member[1]),
        base_version=base_version,
        sample_count=samples,
    )
    chunks = [c for batch in codec.pack(grads.items()) for c in batch]
    if mutate:
        mutate(chunks)
    return iter([ppb.PushRequest(header=header, chunks=chunks)])


def current(node) -> torch.Tensor:
    return dict(node.gate.snapshot(None)[1])["w"]


@pytest.mark.parametrize(
    "member, grads, mutate, code",
    [
        (("worker-0", 2), {"w": torch.ones(3, 2)}, None, grpc.StatusCode.INVALID_ARGUMENT),
        (("worker-0", 2), {"w": torch.ones(2, 3, dtype=torch.float64)}, None, grpc.StatusCode.INVALID_ARGUMENT),
        (
            ("worker-0", 2),
            {"w": torch.ones(2, 3)},
            lambda c: setattr(c[0], "data", c[0].data[:5]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (("worker-0", 2), {"w": torch.ones(2, 3), "v": torch.ones(1)}, None, grpc.StatusCode.INVALID_ARGUMENT),
        (("worker-7", 1), {"w": torch.ones(2, 3)}, None, grpc.StatusCode.NOT_FOUND),
        (("worker-0", 1), {"w": torch.ones(2, 3)}, None, grpc.StatusCode.FAILED_PRECONDITION),
        (("worker-1", 1), {"w": torch.ones(2, 3)}, None, grpc.StatusCode.FAILED_PRECONDITION),
    ],
    ids=[
        "wrong-shape",
        "wrong-dtype",
        "short-bytes",
        "extra-tensor",
        "unknown-member",
        "stale-incarnation",
        "dead-member",
    ],
)
def test_bad_push_gets_precise_status_and_changes_nothing(ps, member, grads, mutate, code):
    servicer, node = ps
    before = current(node).clone()
    error = rejected(lambda: unary(servicer, "Push", push(member, grads, mutate=mutate)))
    assert error.code is code, error.details
    assert torch.equal(current(node), before)
    assert node.status().version == 0
    assert node.status().pushes_rejected == 1
    reply = unary(servicer, "Push", push(("worker-0", 2), {"w": torch.ones(2, 3)}))
    assert reply.outcome == ppb.PUSH_OUTCOME_APPLIED and reply.version == 1
    assert torch.allclose(current(node), before - 0.5)


def test_push_pull_returns_parameters_after_the_push(ps):
    servicer, node = ps
    encoded = streaming(servicer, "PushPull", push(("worker-0", 2), {"w": torch.full((2, 3), 2.0)}))
    messages = [ppb.PullResponse.FromString(m) for m in encoded]  # the servicer answers wire bytes
    assert messages[0].push.outcome == ppb.PUSH_OUTCOME_APPLIED
    values = codec.from_wire([c for m in messages for c in m.chunks])
    assert messages[0].version == 1 and torch.allclose(values["w"], torch.zeros(2, 3))


def test_pull_before_assignment_is_unavailable_with_a_retry_delay():
    node = ParameterServer("ps-0")
    node.update_roster([WorkerEntry("worker-0", 1, True)])
    servicer = ParameterServerServicer(node)
    request = ppb.PullRequest(member=common.MemberRef(member_id="worker-0", incarnation=1))
    error = rejected(lambda: streaming(servicer, "Pull", request))
    assert error.code is grpc.StatusCode.UNAVAILABLE and "not loaded its assignment" in error.details
    assert error.trailing == {"lepton-retry-after-ms": "200"}


def test_pull_of_unknown_tensor_is_not_found(ps):
    servicer, _ = ps
    request = ppb.PullRequest(member=common.MemberRef(member_id="worker-0", incarnation=2), names=["nope"])
    error = rejected(lambda: streaming(servicer, "Pull", request))
    assert error.code is grpc.StatusCode.NOT_FOUND


def test_unexpected_exception_is_internal_and_the_servicer_keeps_working(ps, monkeypatch):
    servicer, node = ps

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(node, "status", broken)
    error = rejected(lambda: unary(servicer, "GetServerStatus", ppb.GetServerStatusRequest()))
    assert error.code is grpc.StatusCode.INTERNAL
    monkeypatch.undo()
    assert unary(servicer, "GetServerStatus", ppb.GetServerStatusRequest()).member_id == "ps-0"


def test_server_status_reports_ssp_mode_and_the_largest_clock_gap():
    node = ParameterServer("ps-0")
    node.load({"w": torch.ones(2, 3)}, "sgd", 0.5, {}, "ssp", step_timeout_s=5.0, staleness=1)
    node.update_roster([WorkerEntry("worker-0", 1, True), WorkerEntry("worker-1", 1, True)])
    servicer = ParameterServerServicer(node)
    for member, base in ((("worker-0", 1), 0), (("worker-1", 1), 1)):  # worker-1 one ahead: within 1
        reply = unary(servicer, "Push", push(member, {"w": torch.ones(2, 3)}, base_version=base))
        assert reply.outcome == ppb.PUSH_OUTCOME_APPLIED and reply.version == base + 1
    status = unary(servicer, "GetServerStatus", ppb.GetServerStatusRequest())
    assert status.mode == common.CONSISTENCY_MODE_SSP and status.max_clock_gap == 1


@pytest.fixture
def sync_ps():
    node = ParameterServer("ps-0")
    node.load({"w": torch.ones(2, 3)}, "sgd", 0.5, {}, "sync", step_timeout_s=5.0)
    node.update_roster(
        [WorkerEntry("worker-0", 2, True), WorkerEntry("worker-1", 1, False), WorkerEntry("worker-2", 1, True)]
    )
    return ParameterServerServicer(node), node


def join(member: tuple[str, int], from_version: int) -> ppb.JoinStepsRequest:
    return ppb.JoinStepsRequest(
        member=common.MemberRef(member_id=member[0], incarnation=member[1]), from_version=from_version
    )


@pytest.mark.parametrize(
    "member, from_version, code",
    [
        (("worker-0", 2), -1, grpc.StatusCode.INVALID_ARGUMENT),
        (("worker-7", 1), 0, grpc.StatusCode.NOT_FOUND),
        (("worker-0", 1), 0, grpc.StatusCode.FAILED_PRECONDITION),
        (("worker-1", 1), 0, grpc.StatusCode.FAILED_PRECONDITION),
    ],
    ids=["negative-version", "unknown-member", "stale-incarnation", "dead-member"],
)
def test_bad_join_steps_gets_precise_status_and_changes_nothing(sync_ps, member, from_version, code):
    servicer, node = sync_ps
    error = rejected(lambda: unary(servicer, "JoinSteps", join(member, from_version)))
    assert error.code is code, error.details
    assert node.gate._participants == set() and node.gate._joins == {}  # noqa: SLF001


def test_join_steps_accepts_the_open_step_refuses_a_passed_one_and_waits_for_a_future_one(sync_ps):
    servicer, node = sync_ps
    reply = unary(servicer, "JoinSteps", join(("worker-0", 2), 0))
    assert reply.joined and reply.version == 0
    assert (
        unary(servicer, "Push", push(("worker-0", 2), {"w": torch.ones(2, 3)})).version == 1
    )  # it alone closes step 0
    reply = unary(servicer, "LeaveSteps", ppb.LeaveStepsRequest(member=join(("worker-0", 2), 0).member))
    reply = unary(servicer, "JoinSteps", join(("worker-0", 2), 0))
    assert not reply.joined and reply.version == 1  # already past: refused, nothing changed
    assert node.gate._participants == set()  # noqa: SLF001
    # A future step while another worker takes part: the server waits up to the call's deadline
    # (FakeContext: 1 s), then says so; the join stands until LeaveSteps.
    assert unary(servicer, "JoinSteps", join(("worker-2", 1), 1)).joined
    error = rejected(lambda: unary(servicer, "JoinSteps", join(("worker-0", 2), 2)))
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED and "did not reach 2" in error.details
    assert node.gate._joins == {"worker-0": 2}  # noqa: SLF001
    unary(servicer, "LeaveSteps", ppb.LeaveStepsRequest(member=join(("worker-0", 2), 0).member))
    assert node.gate._joins == {}  # noqa: SLF001
    # With nobody taking part, nothing would move the version: a future step is joined at once.
    unary(servicer, "LeaveSteps", ppb.LeaveStepsRequest(member=join(("worker-2", 1), 0).member))
    reply = unary(servicer, "JoinSteps", join(("worker-0", 2), 5))
    assert reply.joined and reply.version == 1 and node.gate._participants == {"worker-0"}  # noqa: SLF001
