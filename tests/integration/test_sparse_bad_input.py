"""Row selections that do not fit get precise statuses from a parameter server and change nothing:
one real gRPC server holding a row-sparse table and a dense matrix, a raw generated-stub client."""

from __future__ import annotations

import grpc
import pytest
import torch

from lepton import codec
from lepton.domain import MemberId
from lepton.v1 import common_pb2 as common
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc
from support import serve_parameters

TABLE = torch.arange(40, dtype=torch.float32).reshape(10, 4)
DENSE = torch.ones(3, 4)
SCALAR = torch.tensor(2.0)
MEMBER = common.MemberRef(member_id="w-0", incarnation=1)


@pytest.fixture(scope="module")
def ps():
    node, server = serve_parameters(
        {"table": TABLE, "dense": DENSE, "scalar": SCALAR}, "adam", 0.1, {}, "async",
        workers=[MemberId("w-0", 1)], step_timeout_s=10, sparse=["table"],
    )
    channel = grpc.insecure_channel(server.address)
    try:
        yield node, ppb_grpc.ParameterServerStub(channel)
    finally:
        channel.close()
        server.stop(0)


def pull(stub, names=(), rows=()):
    chunks = []
    for msg in stub.Pull(ppb.PullRequest(member=MEMBER, names=list(names), rows=list(rows)), timeout=10):
        chunks.extend(msg.chunks)
    return codec.from_wire(chunks)


def push(stub, tensors: dict, rows=()):
    header = ppb.PushHeader(member=MEMBER, base_version=0, sample_count=1, request_id="", rows=list(rows))
    batches = list(codec.pack(tensors.items())) or [[]]
    msgs = [ppb.PushRequest(header=header, chunks=batches[0])] + [ppb.PushRequest(chunks=b) for b in batches[1:]]
    return stub.Push(iter(msgs), timeout=10)


def sel(name, rows):
    return common.RowSelection(name=name, rows=rows)


def test_selected_rows_come_back_in_the_requested_order(ps):
    _, stub = ps
    got = pull(stub, names=["dense"], rows=[sel("table", [7, 2, 9])])
    assert set(got) == {"dense", "table"}
    assert torch.equal(got["table"], TABLE[[7, 2, 9]]) and torch.equal(got["dense"], DENSE)
    assert set(pull(stub)) == {"table", "dense", "scalar"}  # nothing asked: everything, whole


@pytest.mark.parametrize(
    "names, rows, code, fragment",
    [
        ([], [sel("table", [10])], grpc.StatusCode.INVALID_ARGUMENT, "outside [0, 10)"),
        ([], [sel("table", [-1])], grpc.StatusCode.INVALID_ARGUMENT, "outside"),
        ([], [sel("table", [3, 3])], grpc.StatusCode.INVALID_ARGUMENT, "more than once"),
        ([], [sel("nope", [0])], grpc.StatusCode.NOT_FOUND, "nope"),
        ([], [sel("scalar", [0])], grpc.StatusCode.INVALID_ARGUMENT, "0-dim"),
        (["table"], [sel("table", [0])], grpc.StatusCode.INVALID_ARGUMENT, "both whole and by rows"),
        ([], [sel("table", [0]), sel("table", [1])], grpc.StatusCode.INVALID_ARGUMENT, "repeated name"),
    ],
)
def test_bad_row_pulls_are_refused(ps, names, rows, code, fragment):
    _, stub = ps
    with pytest.raises(grpc.RpcError) as info:
        pull(stub, names, rows)
    assert info.value.code() == code and fragment in info.value.details(), info.value.details()


def grads(table_rows: int = 2):
    return {"table": torch.ones(table_rows, 4), "dense": torch.ones(3, 4), "scalar": torch.tensor(1.0)}


@pytest.mark.parametrize(
    "tensors, rows, fragment",
    [
        (grads(2), [sel("table", [0, 10])], "outside [0, 10)"),
        (grads(2), [sel("table", [4, 4])], "more than once"),
        (grads(3), [sel("table", [0, 1])], "shape [3, 4] but expected [2, 4]"),
        ({**grads(2), "dense": torch.ones(1, 4)}, [sel("table", [0, 1]), sel("dense", [0])], "is dense"),
        ({**grads(), "table": torch.ones(10, 4)}, [], "by rows"),
        ({k: v for k, v in grads(2).items() if k != "table"}, [sel("table", [0, 1])], "missing"),
        ({**grads(2), "table": torch.full((2, 4), float("nan"))}, [sel("table", [0, 1])], "NaN"),
        (grads(2), [sel("ghost", [0]), sel("table", [0, 1])], "not held here"),
    ],
)
def test_bad_row_pushes_are_refused_and_change_nothing(ps, tensors, rows, fragment):
    node, stub = ps
    before = pull(stub)
    with pytest.raises(grpc.RpcError) as info:
        push(stub, tensors, rows)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert fragment in info.value.details(), info.value.details()
    after = pull(stub)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert node.gate.version == 0


def test_a_push_without_the_table_touches_no_row_and_a_push_by_rows_only_its_rows():
    _, server = serve_parameters(
        {"table": TABLE, "dense": DENSE}, "sgd", 0.5, {}, "async",
        member_id="ps-1", workers=[MemberId("w-0", 1)], step_timeout_s=10, sparse=["table"],
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = ppb_grpc.ParameterServerStub(channel)
            assert push(stub, {"dense": torch.ones(3, 4)}).outcome == ppb.PUSH_OUTCOME_APPLIED
            assert torch.equal(pull(stub)["table"], TABLE)
            assert (
                push(stub, {"table": torch.ones(2, 4), "dense": torch.zeros(3, 4)}, [sel("table", [8, 1])]).version == 2
            )
            table = pull(stub)["table"]
            changed = sorted({int(r) for r in (table != TABLE).any(dim=1).nonzero().flatten()})
            assert changed == [1, 8]
            assert torch.equal(table[1], TABLE[1] - 0.5)
    finally:
        server.stop(0)
