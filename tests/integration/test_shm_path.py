"""The shared-memory data path over real gRPC (127.0.0.1:0): a push-pull through shared memory
ends bit for bit where one over gRPC does, and a client that cannot use shared memory (wrong
nonce, an older server) falls back to gRPC with the push applied once; nothing is left in
/dev/shm."""

from __future__ import annotations

import grpc
import pytest
import torch

from lepton import shm
from lepton.clients import MemberId, ParameterClient
from lepton.v1 import parameter_server_pb2 as ppb
from ps_server.servicer import SERVICE_NAME, ParameterServerServicer
from support import layout_info, serve_layout, serve_parameters, stop_shards
from worker.dataplane import ServerSet

W = MemberId("w-0", 1)


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "net.0.weight": torch.randn(64, 32, generator=g),
        "net.0.bias": torch.randn(64, generator=g),
        "net.2.weight": torch.randn(10, 64, generator=g, dtype=torch.float64),
        "steps": torch.zeros((), dtype=torch.int64),
    }


def gradients(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {
        "net.0.weight": torch.randn(64, 32, generator=g),
        "net.0.bias": torch.randn(64, generator=g),
        "net.2.weight": torch.randn(10, 64, generator=g, dtype=torch.float64),
    }


@pytest.fixture
def started():
    servers, clients = [], []

    def start(shared_memory: bool, mode: str = "async", servicer=None):
        node, server = serve_parameters(
            initial(), "adam", 1e-2, {}, mode, workers=[W], servicer=servicer, step_timeout_s=10.0
        )
        client = ParameterClient(server.address, timeout_s=10.0, shared_memory=shared_memory)
        servers.append(server)
        clients.append(client)
        return node, client

    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.stop(0)
    assert shm.ours() == []  # the servers ran in this process: every segment they made is gone


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_steps_through_shared_memory_end_bit_for_bit_where_grpc_steps_do(started, mode):
    shared_node, shared = started(True, mode)
    plain_node, plain = started(False, mode)
    for step in range(5):
        a_reply, a_version, a_tensors = shared.push_pull(W, step, 3, gradients(step), request_id=f"r{step}")
        b_reply, b_version, b_tensors = plain.push_pull(W, step, 3, gradients(step), request_id=f"r{step}")
        assert a_reply == b_reply and a_version == b_version == step + 1
        assert a_tensors.keys() == b_tensors.keys()
        for name in a_tensors:
            assert torch.equal(a_tensors[name], b_tensors[name]), name
    assert shared.shm is not None and shared.shm.steps == 5 and shared.shm.off_reason == ""
    _, a_pulled = shared.pull(W)
    _, b_pulled = plain.pull(W)
    assert all(torch.equal(a_pulled[n], b_pulled[n]) for n in a_pulled)
    assert shared_node.status().updates_applied == plain_node.status().updates_applied == 5
    assert shm.ours() == []  # confirmed sessions keep no names in /dev/shm


def test_a_two_server_layout_steps_through_shared_memory_as_over_grpc():
    tensors = {n: t for n, t in initial().items() if n != "steps"}
    layouts, sets = [], []
    try:
        for shared_memory in (True, False):
            shards = serve_layout(tensors, 2, "sgd", 0.5, {}, 1, step_timeout_s=10.0, mode="sync")
            layouts.append(shards)
            replica = {n: t.clone() for n, t in tensors.items()}
            servers = ServerSet(
                replica, lambda s=shards: layout_info(s), lambda: W,
                connect=lambda a, s=shared_memory: ParameterClient(a, timeout_s=10.0, shared_memory=s),
            )
            sets.append((servers, replica))
            servers.pull_all()
            for step in range(3):
                replies = servers.push_pull(2, gradients(step), request_id=f"s{step}")
                assert all(r.applied for r in replies.values()) and len(replies) == 2
        (shared, a), (plain, b) = sets
        assert all(torch.equal(a[n], b[n]) for n in tensors)
        assert not torch.equal(a["net.0.weight"], tensors["net.0.weight"])
        assert [c.shm.steps for c in shared._clients.values()] == [3, 3]
    finally:
        for servers, _ in sets:
            servers.close()
        for shards in layouts:
            stop_shards(shards)
    assert shm.ours() == []


def old_server(servicer: ParameterServerServicer, server: grpc.Server) -> None:
    """The service as a server from before shared memory registered it."""
    handlers = {
        "PushPull": grpc.stream_stream_rpc_method_handler(servicer.PushPull, ppb.PushRequest.FromString, lambda b: b),
        "PushPullUnary": grpc.unary_unary_rpc_method_handler(
            servicer.PushPullUnary, ppb.PushRequest.FromString, lambda b: b
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def test_an_older_server_answers_unimplemented_and_the_client_stays_on_grpc(started, monkeypatch):
    import ps_server.servicer as servicer_module

    monkeypatch.setattr(servicer_module, "add_to_server", old_server)
    node, client = started(True)
    reply, version, _ = client.push_pull(W, 0, 1, gradients(0))
    assert reply.applied and version == 1 and node.status().updates_applied == 1
    assert client.shm is not None and "UNIMPLEMENTED" in client.shm.off_reason and client.shm.steps == 0
    assert client.push_pull(W, 1, 1, gradients(1))[1] == 2


def test_a_wrong_nonce_falls_back_to_grpc_and_the_push_applies_once(started):
    node, client = started(True)
    link = client.shm
    assert link is not None
    session = link._ensure(W)
    assert session is not None
    session.nonce = bytes(32)  # as a worker that maps a different /dev/shm would present
    reply, version, tensors = client.push_pull(W, 0, 1, gradients(0), request_id="once")
    assert reply.applied and version == 1 and node.status().updates_applied == 1
    assert "nonce" in link.off_reason and link.steps == 0 and not link.active
    reply, version, _ = client.push_pull(W, 1, 1, gradients(1))
    assert version == 2 and link.steps == 0  # gRPC from now on
