"""The small-step fast path over real gRPC: PushPullUnary answers as PushPull does, a server
without it (UNIMPLEMENTED) sends the client to the stream, and an answer too large for one
message is fetched over the stream with the same request id, so the push is applied once."""

from __future__ import annotations

import grpc
import pytest
import torch

from lepton.clients import UNARY_MAX_BYTES, MemberId, ParameterClient
from lepton.rpc import Server
from lepton.v1 import parameter_server_pb2 as ppb
from ps_server.parameter_server import ParameterServer
from ps_server.roster import WorkerEntry
from ps_server.servicer import SERVICE_NAME, ParameterServerServicer, registration

WORKER = MemberId("worker-0", 1)
LR = 0.5


def node_with(tensors: dict[str, torch.Tensor]) -> ParameterServer:
    node = ParameterServer("ps-0")
    node.load(tensors, "sgd", LR, {}, "async", 10.0)
    node.update_roster([WorkerEntry(WORKER.member_id, WORKER.incarnation, True)])
    return node


def without_unary(servicer: ParameterServerServicer, server: grpc.Server) -> None:
    """The service as a server from before PushPullUnary registered it."""
    handlers = {
        "PushPull": grpc.stream_stream_rpc_method_handler(
            servicer.PushPull, ppb.PushRequest.FromString, lambda b: b
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


@pytest.fixture
def serve():
    started = []

    def start(node: ParameterServer, old: bool = False) -> ParameterClient:
        servicer = ParameterServerServicer(node)
        reg = (without_unary, servicer, SERVICE_NAME) if old else registration(servicer)
        server = Server("127.0.0.1:0", [reg], reflection_enabled=False)
        server.start()
        client = ParameterClient(server.address, timeout_s=10.0)
        started.append((server, client))
        return client

    yield start
    for server, client in started:
        client.close()
        server.stop(0)


def test_a_small_step_goes_unary_and_answers_as_the_stream_does(serve):
    node = node_with({"w": torch.zeros(3, 4), "b": torch.ones(4)})
    client = serve(node)
    grads = {"w": torch.ones(3, 4), "b": torch.full((4,), 2.0)}
    reply, version, tensors = client.push_pull(WORKER, 0, 1, grads)
    assert reply.applied and version == 1 and client.unary_max_bytes > 0
    assert torch.equal(tensors["w"], torch.full((3, 4), -LR)) and torch.equal(tensors["b"], torch.zeros(4))
    client.unary_max_bytes = 0  # the same step over the stream
    reply, version, streamed = client.push_pull(WORKER, 1, 1, grads)
    assert reply.applied and version == 2
    assert torch.equal(streamed["w"], torch.full((3, 4), -2 * LR))
    pending = [client.push_pull_async(WORKER, v, 1, grads) for v in (2, 3)]
    assert [p.result()[1] for p in pending] == [3, 4]


def test_a_server_without_the_unary_method_gets_the_stream(serve):
    node = node_with({"w": torch.zeros(2)})
    client = serve(node, old=True)
    reply, version, tensors = client.push_pull(WORKER, 0, 1, {"w": torch.ones(2)})
    assert reply.applied and version == 1 and torch.equal(tensors["w"], torch.full((2,), -LR))
    assert client.unary_max_bytes == 0  # remembered: later steps stream at once
    assert client.push_pull_async(WORKER, 1, 1, {"w": torch.ones(2)}).result()[1] == 2
    assert node.status().updates_applied == 2


def test_an_answer_too_large_for_one_message_comes_over_the_stream_and_the_push_applies_once(serve):
    big = torch.zeros(9 << 18)  # 9 MiB, never pushed: the answer exceeds the 8 MiB message limit
    node = node_with({"w": torch.zeros(2), "big": big})
    client = serve(node)
    reply, version, tensors = client.push_pull(WORKER, 0, 1, {"w": torch.ones(2)})
    assert reply.applied and version == 1
    assert torch.equal(tensors["w"], torch.full((2,), -LR)) and tensors["big"].shape == big.shape
    assert node.status().updates_applied == 1  # the retry over the stream was answered from memory
    assert client.unary_max_bytes == UNARY_MAX_BYTES // 2  # the unary answer was refused as too large
    reply, version, _ = client.push_pull(WORKER, 1, 1, {"w": torch.ones(2)})
    assert version == 2 and node.status().updates_applied == 2
