"""What the protos promise a client beyond the messages, checked against what the servers do: the
role each method requires (the (lepton.v1.required_role) option against the authorization table),
the documented status codes and retryability of every method, the retry delay of "not ready yet"
answers on the wire, and reflection under both v1 and v1alpha."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from lepton import errors
from lepton.auth import METHOD_ROLES, ROLES
from lepton.rpc import RETRY_AFTER_KEY, Server, translate
from lepton.v1 import common_pb2, coordinator_pb2, options_pb2, parameter_server_pb2
from lepton.v1 import parameter_server_pb2_grpc as ps_grpc
from ps_server.parameter_server import ParameterServer
from ps_server.roster import WorkerEntry
from ps_server.servicer import ParameterServerServicer, registration

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos" / "lepton" / "v1"
SERVICES = [
    coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
    parameter_server_pb2.DESCRIPTOR.services_by_name["ParameterServer"],
]
TOKEN_ROLE = {
    options_pb2.TOKEN_ROLE_ADMIN: "admin",
    options_pb2.TOKEN_ROLE_WORKER: "worker",
    options_pb2.TOKEN_ROLE_PS: "ps",
    options_pb2.TOKEN_ROLE_READER: "reader",
}
METHODS = [(f"/{s.full_name}/{m.name}", m) for s in SERVICES for m in s.methods]


def required_roles(method) -> set[str]:
    return {TOKEN_ROLE[r] for r in method.GetOptions().Extensions[options_pb2.required_role]}


def test_the_token_roles_of_the_protos_are_the_servers_roles():
    assert set(TOKEN_ROLE.values()) == set(ROLES)
    assert set(options_pb2.TokenRole.values()) == {options_pb2.TOKEN_ROLE_UNSPECIFIED, *TOKEN_ROLE}


@pytest.mark.parametrize("path, method", METHODS, ids=[p for p, _ in METHODS])
def test_every_rpc_requires_the_roles_the_server_enforces(path, method):
    roles = required_roles(method)
    assert roles, f"{path} has no (lepton.v1.required_role) option"
    assert "admin" in roles, f"{path}: admin may call every method, so the option lists it"
    assert path in METHOD_ROLES, f"{path} is not in lepton.security.METHOD_ROLES (it would need admin)"
    assert roles == set(METHOD_ROLES[path]), (
        f"{path}: protos say {sorted(roles)}, server enforces {sorted(METHOD_ROLES[path])}"
    )


def test_the_authorization_table_names_no_method_the_protos_lack():
    assert set(METHOD_ROLES) == {path for path, _ in METHODS}


def rpc_comments(proto: Path) -> dict[str, str]:
    """Each rpc's leading comment block in a .proto file, by method name."""
    comments: dict[str, str] = {}
    block: list[str] = []
    for line in proto.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            block.append(stripped[2:].strip())
            continue
        found = re.match(r"rpc\s+(\w+)\s*\(", stripped)
        if found:
            comments[found.group(1)] = " ".join(block)
        block = []
    return comments


@pytest.mark.parametrize("proto", ["coordinator.proto", "parameter_server.proto"])
def test_every_rpc_documents_its_status_codes_and_which_are_retryable(proto):
    comments = rpc_comments(PROTOS / proto)
    service = next(s for s in SERVICES if s.file.name == f"lepton/v1/{proto}")
    assert set(comments) == {m.name for m in service.methods}
    for name, text in comments.items():
        assert "Retryable:" in text, f"{proto} {name}: no 'Retryable:' line"
        assert "Errors:" in text or "Never fails" in text, f"{proto} {name}: no 'Errors:' line"


def test_the_metadata_header_and_the_retry_delay_key_are_in_the_contract():
    text = (PROTOS / "options.proto").read_text()
    assert "authorization: Bearer <token>" in text
    assert RETRY_AFTER_KEY in text
    for proto in ("coordinator.proto", "parameter_server.proto"):
        assert RETRY_AFTER_KEY in (PROTOS / proto).read_text()


@pytest.fixture
def bare_parameter_server():
    """A parameter server that serves but has no assignment yet, over real gRPC."""
    node = ParameterServer("ps-0")
    node.update_roster([WorkerEntry("worker-0", 1, True)])
    server = Server("127.0.0.1:0", [registration(ParameterServerServicer(node))])
    server.start()
    channel = grpc.insecure_channel(server.address)
    try:
        yield channel
    finally:
        channel.close()
        server.stop(0.1)


def test_a_pull_before_the_assignment_is_unavailable_with_the_retry_delay_in_the_trailers(bare_parameter_server):
    stub = ps_grpc.ParameterServerStub(bare_parameter_server)
    request = parameter_server_pb2.PullRequest(member=common_pb2.MemberRef(member_id="worker-0", incarnation=1))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Pull(request, timeout=5))
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert dict(info.value.trailing_metadata())[RETRY_AFTER_KEY] == "200"
    error = translate(info.value)
    assert isinstance(error, errors.NotReady) and isinstance(error, errors.Unavailable)
    assert error.retry_after_s == pytest.approx(0.2)


@pytest.mark.parametrize("service", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"])
def test_reflection_answers_under_v1_and_v1alpha(bare_parameter_server, service):
    # The two versions' messages are identical on the wire, so v1alpha's classes speak v1 too.
    call = bare_parameter_server.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="lepton.v1.ParameterServer"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=service),
    ]
    listed, lepton_file, own_file = list(call(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {"lepton.v1.ParameterServer", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    from google.protobuf import descriptor_pb2

    first = descriptor_pb2.FileDescriptorProto.FromString(lepton_file.file_descriptor_response.file_descriptor_proto[0])
    assert first.name == "lepton/v1/parameter_server.proto"
    own = descriptor_pb2.FileDescriptorProto.FromString(own_file.file_descriptor_response.file_descriptor_proto[0])
    assert own.package == service.rsplit(".", 1)[0]
