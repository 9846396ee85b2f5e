"""Compressed pushes over real gRPC (parameter servers on 127.0.0.1:0, the worker's own data path
``worker.dataplane.ServerSet`` with error feedback): what the servers apply is the sum of the true
gradients less the residual the worker keeps, across row slices on several servers; a retried push
is applied once and commits its residual once; a stale push commits nothing; and encoded chunks
that break the rules get INVALID_ARGUMENT from the server, which changes nothing."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch

from lepton import codec, encodings
from lepton.clients import MemberId, ParameterClient
from lepton.tensors import TensorKind
from lepton.v1 import common_pb2 as common
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc
from support import ServedShard, layout_info, serve_layout, serve_parameters, stop_shards
from worker.compression import ErrorFeedback
from worker.dataplane import ServerSet

LR = 1.0  # SGD: a server's parameter moves by exactly minus the gradient it applied
MEMBER = MemberId("w-0", 1)
SHAPES = {"w": (9, 6), "b": (6,), "v": (5,)}


def initial() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}


@pytest.fixture
def shards() -> Iterator[list[ServedShard]]:
    """Three async SGD servers; the layout cuts "w" into row slices on different servers."""
    served = serve_layout(initial(), 3, "sgd", LR, {}, 1, step_timeout_s=10.0, mode="async")
    try:
        assert any(spec.is_slice for shard in served for spec in shard.specs)
        yield served
    finally:
        stop_shards(served)


def dataplane(shards: list[ServedShard], encoding: int) -> tuple[ServerSet, ErrorFeedback, dict]:
    replica = {n: t.clone() for n, t in initial().items()}
    layout = layout_info(shards)
    fb = ErrorFeedback(encoding, topk_ratio=0.1)
    servers = ServerSet(
        replica, lambda: layout, lambda: MEMBER,
        connect=lambda address: ParameterClient(address, timeout_s=10.0), compression=fb,
    )
    return servers, fb, replica


def whole_residual(fb: ErrorFeedback, name: str) -> torch.Tensor:
    r = fb._residuals.get(name)
    return torch.zeros(SHAPES[name]) if r is None else r


@pytest.mark.parametrize("encoding", [encodings.FP16, encodings.BF16, encodings.TOPK, encodings.SIGN])
def test_servers_apply_the_gradient_sum_less_the_residual(shards, encoding):
    servers, fb, replica = dataplane(shards, encoding)
    gen = torch.Generator().manual_seed(11)
    total = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    raw_bytes = 0
    try:
        servers.pull_all()
        for step in range(12):
            grads = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
            for n, g in grads.items():
                total[n] += g.double()
            raw_bytes += sum(g.numel() * 4 for g in grads.values())
            replies = servers.push_pull(8, grads, request_id=f"r{step}", timeout_s=10.0)
            assert all(r.applied for r in replies.values())
        for n, start in initial().items():
            moved = (start.double() - replica[n].double()) / LR  # the replica holds what the servers answered
            expected = total[n] - whole_residual(fb, n).double()
            assert torch.allclose(moved, expected, atol=1e-4), (n, (moved - expected).abs().max())
        assert 0 < servers.bytes_pushed < raw_bytes  # encoded bytes are what is counted
    finally:
        servers.close()


class Recording(ParameterClient):
    """A client that remembers the payload bytes of every push it sends."""

    sent: list[bytes] = []

    def push_pull(self, member, base_version, samples, grads, timeout_s=None, request_id=""):
        Recording.sent.append(b"".join(bytes(g.payload.numpy()) for g in grads.values()
                                       if isinstance(g, encodings.Encoded)))
        return super().push_pull(member, base_version, samples, grads, timeout_s, request_id)


def test_a_retry_sends_the_same_bytes_and_commits_once_and_a_stale_push_commits_nothing():
    start = {"w": torch.zeros(4, 3)}
    node, server = serve_parameters(start, "sgd", LR, {}, "async", workers=[MEMBER])
    Recording.sent = []
    try:
        layout = layout_info([ServedShard("ps-0", node, server, tuple(node.specs.values()))])
        fb = ErrorFeedback(encodings.SIGN)
        replica = {"w": torch.zeros(4, 3)}
        servers = ServerSet(replica, lambda: layout, lambda: MEMBER,
                            connect=lambda a: Recording(a, timeout_s=10.0), compression=fb)
        g = torch.tensor([[1.0, -2.0, 3.0], [0.5, -0.5, 4.0], [1.0, 1.0, 1.0], [-3.0, 2.0, 0.0]])
        servers.push_pull(1, {"w": g}, request_id="same", timeout_s=10.0)
        after_one = replica["w"].clone()
        residual = fb.residual(node.specs["w"]).clone()
        servers.push_pull(1, {"w": g}, request_id="same", timeout_s=10.0)  # the answer was lost: retry
        assert Recording.sent[0] == Recording.sent[1]
        assert node.status().updates_applied == 1 and torch.equal(replica["w"], after_one)
        assert torch.equal(fb.residual(node.specs["w"]), residual)  # committed once
        _, sent = encodings.encode(g, encodings.SIGN)
        assert torch.allclose(residual, g - sent)

        servers.versions["ps-0"] = 100  # a version the server never served: STALE, nothing applied
        replies = servers.push_pull(1, {"w": g}, request_id="stale", timeout_s=10.0)
        assert not replies["ps-0"].applied
        assert torch.equal(fb.residual(node.specs["w"]), residual)
        servers.close()
    finally:
        server.stop(0)


# --- malformed encoded chunks --------------------------------------------------------------------

W = torch.arange(8, dtype=torch.float32).reshape(2, 4)


@pytest.fixture(scope="module")
def ps():
    node, server = serve_parameters(
        {"w": W, "table": torch.ones(3, 2), "buf": torch.zeros(4)}, "sgd", LR, {}, "async",
        workers=[MEMBER], sparse=["table"], kinds={"buf": TensorKind.BUFFER},
    )
    channel = grpc.insecure_channel(server.address)
    try:
        yield node, ppb_grpc.ParameterServerStub(channel)
    finally:
        channel.close()
        server.stop(0)


TOPK_INDEX_9 = (9).to_bytes(4, "little") + b"\x00" * 4  # one entry: index 9 of 8 elements, value 0


def chunk(name="w", shape=(2, 4), encoding=encodings.FP16, data=b"\x00\x3c" * 8, offset=0):
    return common.TensorChunk(name=name, dtype=common.DTYPE_FLOAT32, shape=list(shape), offset_bytes=offset,
                              data=data, encoding=encoding)


def header(rows=()):
    return ppb.PushHeader(member=common.MemberRef(member_id=MEMBER.member_id, incarnation=1), base_version=0,
                          sample_count=1, rows=list(rows))


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([ppb.PushRequest(header=header(), chunks=[chunk(data=b"\x00" * 15)])],
         "received 15 of 16 (FP16-encoded) bytes"),
        ([ppb.PushRequest(header=header(), chunks=[chunk(encoding=7)])], "unknown encoding 7"),
        ([ppb.PushRequest(header=header(), chunks=[chunk(encoding=encodings.SIGN, data=b"\x00\x00\xc0\x7f\xff")])],
         "scale must be finite"),
        ([ppb.PushRequest(header=header(), chunks=[chunk(encoding=encodings.TOPK, data=TOPK_INDEX_9)])],
         "index 9 outside [0, 8)"),
        ([ppb.PushRequest(header=header(), chunks=[chunk(encoding=encodings.TOPK, data=b"\x01" * 8)]),
          ppb.PushRequest(chunks=[chunk(encoding=encodings.TOPK, data=b"\x01" * 8, offset=8)])], "one chunk"),
        ([ppb.PushRequest(header=header(), chunks=[chunk(name="buf", shape=(4,), data=b"\x00" * 8)])],
         "not a trainable floating-point parameter"),
        ([ppb.PushRequest(header=header([common.RowSelection(name="table", rows=[1])]),
                          chunks=[chunk(name="table", shape=(1, 2), data=b"\x00" * 4)])], "pushed by rows"),
        ([ppb.PushRequest(header=header(), chunks=[chunk(encoding=encodings.SIGN, data=b"\x00\x00\x80\x3f")])],
         "received 4 of 5 (SIGN-encoded) bytes"),
    ],
)
@pytest.mark.parametrize("method", ["Push", "PushPullUnary"])
def test_malformed_encoded_pushes_are_refused_and_change_nothing(ps, messages, fragment, method):
    node, stub = ps
    before = node.status()
    with pytest.raises(grpc.RpcError) as info:
        if method == "Push":
            stub.Push(iter(messages), timeout=10)
        else:  # every chunk in the one message
            one = ppb.PushRequest(header=messages[0].header, chunks=[c for m in messages for c in m.chunks])
            stub.PushPullUnary(one, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert fragment in info.value.details(), info.value.details()
    after = node.status()
    assert after.version == before.version and after.updates_applied == before.updates_applied
    assert after.pushes_rejected == before.pushes_rejected + 1
    pulled = codec.from_wire(c for m in stub.Pull(ppb.PullRequest(
        member=common.MemberRef(member_id=MEMBER.member_id, incarnation=1), names=["w"]), timeout=10) for c in m.chunks)
    assert torch.equal(pulled["w"], W)


def test_a_well_formed_encoded_push_applies_its_decoded_gradient(ps):
    node, stub = ps
    g = torch.tensor([[1.0, -2.0, 0.0, 0.5], [3.0, 0.0, 0.0, -1.0]])
    e, sent = encodings.encode(g, encodings.TOPK, 0.5)
    reply = stub.Push(iter([ppb.PushRequest(header=header(), chunks=[
        chunk(encoding=encodings.TOPK, data=bytes(e.payload.numpy()))])]), timeout=10)
    assert reply.outcome == ppb.PUSH_OUTCOME_APPLIED
    pulled = codec.from_wire(c for m in stub.Pull(ppb.PullRequest(
        member=common.MemberRef(member_id=MEMBER.member_id, incarnation=1), names=["w"]), timeout=10) for c in m.chunks)
    assert torch.equal(pulled["w"], W - LR * sent)


def test_the_server_counts_the_bytes_that_travelled(ps):
    node, stub = ps
    before = node.status().bytes_pushed
    e, _ = encodings.encode(torch.ones(2, 4), encodings.SIGN)
    stub.Push(iter([ppb.PushRequest(header=header(), chunks=[
        chunk(encoding=encodings.SIGN, data=bytes(e.payload.numpy()))])]), timeout=10)
    assert node.status().bytes_pushed - before == 5  # a float32 scale and one byte of bits, not 32 bytes


def test_a_compressed_push_from_a_shared_memory_client_goes_over_grpc():
    from lepton import shm

    node, server = serve_parameters({"w": torch.zeros(4, 3)}, "sgd", LR, {}, "async", workers=[MEMBER])
    client = ParameterClient(server.address, timeout_s=10.0, shared_memory=True)
    try:
        raw = torch.ones(4, 3)
        client.push_pull(MEMBER, 0, 1, {"w": raw}, request_id="raw")
        assert client.shm is not None and client.shm.steps == 1  # raw pushes take shared memory
        e, sent = encodings.encode(torch.full((4, 3), 2.0), encodings.FP16)
        reply, _, tensors = client.push_pull(MEMBER, 1, 1, {"w": e}, request_id="fp16")
        assert reply.applied and client.shm.steps == 1  # the encoded one did not
        assert torch.equal(tensors["w"], -LR * (raw + sent))
    finally:
        client.close()
        server.stop(0)
    assert shm.ours() == []
