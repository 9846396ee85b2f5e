"""Raw random bytes sent to every method of every service: a precise status (INVALID_ARGUMENT for
bytes that are no message at all), never INTERNAL or UNKNOWN, parameters unchanged, and the
server keeps serving. Property-based (hypothesis), bounded in examples."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc

from .raw_rpc import METHOD_IDS, METHODS, call_raw

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}


def identity(b: bytes) -> bytes:
    return b


def parses_as_request(method, payload: bytes) -> bool:
    """Whether ``payload`` is a valid request message of ``method`` (random bytes sometimes are)."""
    request = message_factory.GetMessageClass(method.input_type)()
    try:
        request.ParseFromString(payload)
    except Exception:  # noqa: BLE001 - any parse failure means "not a message"
        return False
    return True


def send_raw(channel: grpc.Channel, service, method, payloads: list[bytes]) -> grpc.StatusCode:
    return call_raw(channel, service, method, payloads, identity, identity)


@pytest.mark.parametrize("service, method", METHODS, ids=METHOD_IDS)
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
            code = send_raw(channel, service, method, payloads)
            codes.add(code)
            # A valid WatchJob request for events yet to come waits for them: the client's deadline
            # ends it, which is the right answer, not a confused server.
            waited = method.server_streaming and parses_as_request(method, payloads[0])
            allowed = ALLOWED | {grpc.StatusCode.DEADLINE_EXCEEDED} if waited else ALLOWED
            assert code in allowed, f"{path} answered {code} to {payloads!r}"

        probe()
        garbage = b"\xff\xff\xff\xff\x0f"  # a truncated varint: no message at all
        assert send_raw(channel, service, method, [garbage]) is grpc.StatusCode.INVALID_ARGUMENT
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(idle_cluster.servers[0]) as ps_channel:
        status = ppb_grpc.ParameterServerStub(ps_channel).GetServerStatus(ppb.GetServerStatusRequest(), timeout=5)
    assert status.version == version_before
