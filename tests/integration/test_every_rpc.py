"""Every RPC of every service answers an empty request over the wire with a deliberate status —
never UNIMPLEMENTED, UNKNOWN or INTERNAL — so each is implemented and behind the error table."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import symbol_database

from lepton.v1 import coordinator_pb2, parameter_server_pb2

ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
METHODS = [
    (coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"], m)
    for m in coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods
] + [
    (parameter_server_pb2.DESCRIPTOR.services_by_name["ParameterServer"], m)
    for m in parameter_server_pb2.DESCRIPTOR.services_by_name["ParameterServer"].methods
]


@pytest.mark.parametrize("service, method", METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS])
def test_empty_request_gets_a_deliberate_status(idle_cluster, service, method):
    address = idle_cluster.coordinator if service.name == "Coordinator" else idle_cluster.servers[0]
    db = symbol_database.Default()
    request_cls = db.GetSymbol(method.input_type.full_name)
    response_cls = db.GetSymbol(method.output_type.full_name)
    path = f"/{service.full_name}/{method.name}"
    with grpc.insecure_channel(address) as channel:
        kind = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        rpc = kind(path, request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString)
        request = iter([request_cls()]) if method.client_streaming else request_cls()
        try:
            result = rpc(request, timeout=5)
            if method.server_streaming:
                next(iter(result), None)  # WatchJob streams forever: one answer is enough
                result.cancel()
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
    assert code in ACCEPTABLE, f"{path} answered {code}"
