"""Every RPC of every service answers an empty request over the wire with a deliberate status —
never UNIMPLEMENTED, UNKNOWN or INTERNAL — so each is implemented and behind the error table."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import symbol_database

from .raw_rpc import METHOD_IDS, METHODS, call_raw

ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}


@pytest.mark.parametrize("service, method", METHODS, ids=METHOD_IDS)
def test_empty_request_gets_a_deliberate_status(idle_cluster, service, method):
    address = idle_cluster.coordinator if service.name == "Coordinator" else idle_cluster.servers[0]
    db = symbol_database.Default()
    request_cls = db.GetSymbol(method.input_type.full_name)
    response_cls = db.GetSymbol(method.output_type.full_name)
    with grpc.insecure_channel(address) as channel:
        code = call_raw(
            channel, service, method, [request_cls()], request_cls.SerializeToString, response_cls.FromString
        )
    assert code in ACCEPTABLE, f"/{service.full_name}/{method.name} answered {code}"
