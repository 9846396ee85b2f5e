"""Raw random bytes sent to every method of every service: a precise status (INVALID_ARGUMENT for
bytes that are no message at all), never INTERNAL or UNKNOWN, parameters unchanged, and the
server keeps serving. Property-based (hypothesis), bounded in examples."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.v1 import coordinator_pb2, parameter_server_pb2
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
METHODS = [
    (svc, m)
    for svc in (
        coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
        parameter_server_pb2.DESCRIPTOR.services_by_name["ParameterServer"],
    )
    for m in svc.methods
]


def identity(b: bytes) -> bytes:
    return b


def send_raw(channel: grpc.Channel, path: str, method, payloads: list[bytes]) -> grpc.StatusCode:
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    rpc = kind(path, request_serializer=identity, response_deserializer=identity)
    request = iter(payloads) if method.client_streaming else payloads[0]
    try:
        result = rpc(request, timeout=5)
        if method.server_streaming:
            next(iter(result), None)  # WatchJob would stream for ever: one answer is enough
            result.cancel()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


@pytest.mark.parametrize("service, method", METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS])
def test_random_bytes_get_a_precise_status_and_change_nothing(idle_cluster, service, method):
    address = idle_cluster.coordinator if service.name == "Coordinator" else idle_cluster.servers[0]
    path = f"/{service.full_name}/{method.name}"
    with grpc.insecure_channel(idle_cluster.servers[0]) as ps_channel:
        version_before = ppb_grpc.ParameterServerStub(ps_channel).GetServerStatus(
            ppb.GetServerStatusRequest(), timeout=5
        ).version

    codes: set[grpc.StatusCode] = set()
    with grpc.insecure_channel(address) as channel:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.binary(min_size=1, max_size=256), min_size=1, max_size=3))
        def probe(payloads: list[bytes]) -> None:
            code = send_raw(channel, path, method, payloads)
            codes.add(code)
            assert code in ALLOWED, f"{path} answered {code} to {payloads!r}"

        probe()
        garbage = b"\xff\xff\xff\xff\x0f"  # a truncated varint: no message at all
        assert send_raw(channel, path, method, [garbage]) is grpc.StatusCode.INVALID_ARGUMENT
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(idle_cluster.servers[0]) as ps_channel:
        status = ppb_grpc.ParameterServerStub(ps_channel).GetServerStatus(ppb.GetServerStatusRequest(), timeout=5)
    assert status.version == version_before
