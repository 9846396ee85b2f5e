"""Malformed requests from a raw gRPC client (generated stubs, no Lepton client code) get precise
statuses, change nothing, and the servers keep serving."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lepton import codec
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cpb_grpc
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc
from support import wait_until

OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


@pytest.fixture(scope="module")
def raw(idle_cluster):
    coord_channel = grpc.insecure_channel(idle_cluster.coordinator, options=OPTIONS)
    ps_channel = grpc.insecure_channel(idle_cluster.servers[0], options=OPTIONS)
    coord = cpb_grpc.CoordinatorStub(coord_channel)
    ps = ppb_grpc.ParameterServerStub(ps_channel)
    wait_until(
        lambda: coord.GetStatus(cpb.GetStatusRequest(), timeout=5).state == cpb.JOB_STATE_TRAINING, 60, "training"
    )
    reply = coord.RegisterMember(cpb.RegisterMemberRequest(role=common.ROLE_WORKER), timeout=5)
    yield coord, ps, reply.member, (coord_channel, ps_channel)
    coord_channel.close()
    ps_channel.close()


def pull(ps, member) -> tuple[int, dict[str, torch.Tensor]]:
    version, chunks = -1, []
    for msg in ps.Pull(ppb.PullRequest(member=member), timeout=10):
        version = msg.version
        chunks.extend(msg.chunks)
    return version, codec.from_wire(chunks)


def push_messages(member, base_version, tensors: dict, samples: int = 4):
    header = ppb.PushHeader(member=member, base_version=base_version, sample_count=samples, request_id="t")
    batches = list(codec.pack(tensors.items()))
    yield ppb.PushRequest(header=header, chunks=batches[0])
    for batch in batches[1:]:
        yield ppb.PushRequest(chunks=batch)


def assert_rejected(call, code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details(), info.value.details()


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def zero_grads(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, 0.01) for k, v in params.items()}


def test_a_well_formed_push_is_applied(raw):
    coord, ps, member, _ = raw
    version, before = pull(ps, member)
    reply = ps.Push(push_messages(member, version, zero_grads(before)), timeout=10)
    assert reply.outcome == ppb.PUSH_OUTCOME_APPLIED and reply.version == version + 1
    _, after = pull(ps, member)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "corrupt, code, fragment",
    [
        ("wrong_shape", grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        ("wrong_dtype", grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
        ("short_bytes", grpc.StatusCode.INVALID_ARGUMENT, "complete"),
        ("long_bytes", grpc.StatusCode.INVALID_ARGUMENT, "needs"),
        ("unknown_tensor", grpc.StatusCode.INVALID_ARGUMENT, "not held"),
        ("nan", grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        ("no_header", grpc.StatusCode.INVALID_ARGUMENT, "header"),
        ("unknown_dtype", grpc.StatusCode.INVALID_ARGUMENT, "dtype code"),
        ("zero_samples", grpc.StatusCode.INVALID_ARGUMENT, "sample_count"),
        ("unknown_member", grpc.StatusCode.NOT_FOUND, "not a worker"),
    ],
)
def test_malformed_push_is_rejected_and_changes_nothing(raw, idle_cluster, corrupt, code, fragment):
    coord, ps, member, _ = raw
    version, before = pull(ps, member)
    name = next(iter(before))
    grads = zero_grads(before)
    samples = 4
    target = member
    if corrupt == "wrong_shape":
        grads[name] = torch.zeros(3, 3)
    elif corrupt == "wrong_dtype":
        grads[name] = grads[name].double()
    elif corrupt == "unknown_tensor":
        grads["no.such.tensor"] = torch.zeros(2)
    elif corrupt == "nan":
        grads[name][0] = float("nan")
    elif corrupt == "zero_samples":
        samples = 0
    elif corrupt == "unknown_member":
        target = common.MemberRef(member_id="worker-404", incarnation=1)

    def messages():
        stream = list(push_messages(target, version, grads, samples))
        first = stream[0]
        if corrupt == "short_bytes":
            first.chunks[0].data = first.chunks[0].data[:-4]
        elif corrupt == "long_bytes":
            first.chunks[0].data = first.chunks[0].data + b"\0\0\0\0"
        elif corrupt == "unknown_dtype":
            first.chunks[0].dtype = 99
        elif corrupt == "no_header":
            first.ClearField("header")
        return iter(stream)

    assert_rejected(lambda: ps.Push(messages(), timeout=10), code, fragment)
    after_version, after = pull(ps, member)
    assert after_version == version
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert serving(idle_cluster.servers[0])


def test_push_from_a_superseded_incarnation_is_fenced(raw, idle_cluster):
    coord, ps, _, _ = raw
    old = coord.RegisterMember(cpb.RegisterMemberRequest(role=common.ROLE_WORKER), timeout=5).member
    version, before = pull(ps, old)
    new = coord.RegisterMember(
        cpb.RegisterMemberRequest(role=common.ROLE_WORKER, member_id=old.member_id), timeout=5
    ).member
    assert new.incarnation == old.incarnation + 1
    # The server learns of the new incarnation on its next heartbeat (every 0.2 s here).
    wait_until(lambda: pull(ps, new), 10, "the server to accept the new incarnation")
    assert_rejected(
        lambda: ps.Push(push_messages(old, version, zero_grads(before)), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        "fenced",
    )
    assert_rejected(
        lambda: coord.Heartbeat(cpb.HeartbeatRequest(member=old), timeout=5),
        grpc.StatusCode.FAILED_PRECONDITION,
        "fenced",
    )
    after_version, after = pull(ps, new)
    assert after_version == version and all(torch.equal(before[k], after[k]) for k in before)


def test_oversize_message_is_resource_exhausted(raw, idle_cluster):
    coord, ps, member, _ = raw
    version, before = pull(ps, member)
    huge = ppb.PushRequest(
        header=ppb.PushHeader(member=member, base_version=version, sample_count=1),
        chunks=[common.TensorChunk(name="x", dtype=common.DTYPE_UINT8, shape=[9 << 20], data=bytes(9 << 20))],
    )
    assert_rejected(lambda: ps.Push(iter([huge]), timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED, "")
    assert pull(ps, member)[0] == version
    assert serving(idle_cluster.servers[0])


def test_coordinator_rejects_bad_shard_reports_precisely(raw, idle_cluster):
    coord, _, member, _ = raw
    before = coord.GetStatus(cpb.GetStatusRequest(), timeout=5)
    cases = [
        (
            cpb.ReportProgressRequest(member=member, epoch=0, shard=999, offset=1),
            grpc.StatusCode.NOT_FOUND,
            "no shard 999",
        ),
        (
            cpb.ReportProgressRequest(member=member, epoch=0, shard=1, offset=1),
            grpc.StatusCode.FAILED_PRECONDITION,
            "does not hold",
        ),
        (
            cpb.ReportProgressRequest(member=member, epoch=7, shard=1, offset=1),
            grpc.StatusCode.NOT_FOUND,
            "has not started",
        ),
        (
            cpb.ReportProgressRequest(member=common.MemberRef(member_id="worker-404", incarnation=1), shard=0),
            grpc.StatusCode.NOT_FOUND,
            "no member",
        ),
        (cpb.ReportProgressRequest(shard=0), grpc.StatusCode.INVALID_ARGUMENT, "member_id"),
    ]
    for request, code, fragment in cases:
        assert_rejected(lambda request=request: coord.ReportProgress(request, timeout=5), code, fragment)
    assert_rejected(
        lambda: coord.CompleteShard(cpb.CompleteShardRequest(member=member, epoch=0, shard=999), timeout=5),
        grpc.StatusCode.NOT_FOUND,
        "no shard",
    )
    assert_rejected(
        lambda: coord.RegisterMember(cpb.RegisterMemberRequest(), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "role",
    )
    after = coord.GetStatus(cpb.GetStatusRequest(), timeout=5)
    assert after.shard_completions == before.shard_completions
    assert after.shards_pending == before.shards_pending
    assert serving(idle_cluster.coordinator)


def test_a_retried_push_with_the_same_request_id_is_applied_at_most_once(raw):
    _, ps, member, _ = raw
    version, before = pull(ps, member)

    def attempt():
        stream = list(push_messages(member, version, zero_grads(before)))
        stream[0].header.request_id = "retry-me-1"
        return ps.Push(iter(stream), timeout=10)

    first, second = attempt(), attempt()
    assert first == second and first.version == version + 1
    assert pull(ps, member)[0] == version + 1
