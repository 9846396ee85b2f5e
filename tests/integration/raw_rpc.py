"""Calling any method of Lepton's services by its descriptor, without Lepton's client code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from lepton.v1 import coordinator_pb2, parameter_server_pb2

SERVICES = (
    coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
    parameter_server_pb2.DESCRIPTOR.services_by_name["ParameterServer"],
)
METHODS = [(service, method) for service in SERVICES for method in service.methods]
METHOD_IDS = [f"{s.name}.{m.name}" for s, m in METHODS]


def call_raw(
    channel: grpc.Channel,
    service,
    method,
    requests: list[Any],
    serialize: Callable[[Any], bytes],
    deserialize: Callable[[bytes], Any],
) -> grpc.StatusCode:
    """Sends ``requests`` (one for unary requests, all of them for request streams) and returns the
    status; a response stream is read for one message only (WatchJob never ends by itself)."""
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    rpc = kind(f"/{service.full_name}/{method.name}", request_serializer=serialize, response_deserializer=deserialize)
    request = iter(requests) if method.client_streaming else requests[0]
    try:
        result = rpc(request, timeout=5)
        if method.server_streaming:
            next(iter(result), None)
            result.cancel()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()
