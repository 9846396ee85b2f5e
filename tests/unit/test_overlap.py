"""worker/overlap.py with fake parameter servers: each server's push-pull starts from the hooks
while backward still runs, answers are installed only after it, the rules that turn overlap off,
a parameter used twice, a retry, and the prefetching thread."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from lepton.clients import LayoutInfo, MemberId, PushReply, ServerInfo
from lepton.errors import Unavailable
from lepton.tensors import TensorKind, TensorSpec
from worker.dataplane import ServerSet
from worker.overlap import BackwardPush, blocker, prefetched

DEADLINE_S = 10.0
CPU = torch.device("cpu")


class FakeServer:
    """A ParameterClient for one server: records each push and answers with values of its own
    (every tensor it holds, filled with ``answer``)."""

    def __init__(self, specs: list[TensorSpec], answer: float) -> None:
        self.specs, self.answer = specs, answer
        self.pushes: list[tuple[str, dict[str, torch.Tensor]]] = []  # (request id, share cloned)
        self.called = threading.Event()
        self.fail_next = False

    def push_pull(self, member, base_version, samples, share, timeout_s=None, request_id=""):
        self.pushes.append((request_id, {n: t.clone() for n, t in share.items()}))
        self.called.set()
        if self.fail_next:
            self.fail_next = False
            raise Unavailable("the answer was lost")
        tensors = {t.name: torch.full(t.shape, self.answer, dtype=t.dtype) for t in self.specs}
        return PushReply(True, base_version + 1, 0), base_version + 1, tensors

    def close(self) -> None:
        pass


class Gate(torch.autograd.Function):
    """Identity; its backward (reached once every later layer's gradients are done) waits for
    ``event``, so a push that starts only after backward can never set it."""

    event: threading.Event | None = None
    waited: bool | None = None

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if Gate.event is not None:
            Gate.waited = Gate.event.wait(DEADLINE_S)
        return grad


class TwoLayers(nn.Module):
    def __init__(self, gate: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 8)
        self.last = nn.Linear(8, 3)
        self.gate = gate

    def forward(self, x):
        h = torch.relu(self.first(x))
        return self.last(Gate.apply(h) if self.gate else h)


def split_layout(model: nn.Module, groups: dict[str, list[str]]) -> tuple[LayoutInfo, dict[str, FakeServer]]:
    """One fake server per group of whole parameters."""
    params = dict(model.named_parameters())
    fakes, servers = {}, []
    for i, (server_id, names) in enumerate(groups.items()):
        specs = [TensorSpec(n, params[n].dtype, tuple(params[n].shape)) for n in names]
        fakes[server_id] = FakeServer(specs, answer=float(i + 1))
        servers.append(ServerInfo(server_id, f"127.0.0.1:{i + 1}", tuple(specs)))
    return LayoutInfo(1, tuple(servers)), fakes


def server_set(model: nn.Module, layout: LayoutInfo, fakes: dict[str, FakeServer]) -> ServerSet:
    by_address = {s.address: fakes[s.member_id] for s in layout.servers}
    member = MemberId("w-0", 1)
    return ServerSet(
        dict(model.named_parameters()), lambda: layout, lambda: member,
        connect=lambda address: by_address[address],  # type: ignore[arg-type,return-value]
    )


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(5, 4, generator=generator), torch.tensor([0, 1, 2, 1, 0])


def test_the_last_layers_server_pushes_while_backward_runs_and_nothing_is_installed_before_it_ends():
    model = TwoLayers(gate=True)
    layout, fakes = split_layout(model, {"ps-last": ["last.weight", "last.bias"],
                                         "ps-first": ["first.weight", "first.bias"]})
    servers = server_set(model, layout, fakes)
    push = BackwardPush(servers, dict(model.named_parameters()), {})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Gate.event, Gate.waited = fakes["ps-last"].called, None
    try:
        loss, grads, in_flight = push.gradients(lambda: gradients(model, *batch()), 5, "r-1")
    finally:
        Gate.event = None
        push.close()
    # The first layer's backward waited for the last layer's push: it began during backward.
    assert Gate.waited is True
    assert in_flight.during_backward == ["ps-last", "ps-first"]
    for name, value in before.items():  # backward is over, the answers are not installed yet
        assert torch.equal(dict(model.named_parameters())[name], value), name
    replies = in_flight.finish(grads)
    assert set(replies) == {"ps-last", "ps-first"} and all(r.applied for r in replies.values())
    params = dict(model.named_parameters())
    assert torch.equal(params["last.weight"], torch.full((3, 8), 1.0))
    assert torch.equal(params["first.bias"], torch.full((8,), 2.0))
    for server_id, fake in fakes.items():  # each server got its share of this step's gradients, once
        ((request_id, share),) = fake.pushes
        assert request_id == "r-1"
        assert set(share) == {t.name for t in fake.specs}
        for name, value in share.items():
            assert torch.equal(value, grads[name]), (server_id, name)
    assert servers.versions == {"ps-last": 1, "ps-first": 1}
    servers.close()


def test_the_hooks_push_nothing_when_not_armed():
    model = TwoLayers()
    layout, fakes = split_layout(model, {"ps-0": [n for n, _ in model.named_parameters()]})
    servers = server_set(model, layout, fakes)
    push = BackwardPush(servers, dict(model.named_parameters()), {})
    servers.ensure_layout()
    gradients(model, *batch())  # evaluation or the fallback path: backward without a step armed
    assert fakes["ps-0"].pushes == []
    push.close()
    servers.close()


def test_a_parameter_used_twice_and_a_tied_one_push_their_final_gradient_once():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.square = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)
            self.tied = nn.Linear(4, 3)
            self.tied.weight = self.out.weight  # one parameter, two modules

        def forward(self, x):
            h = self.square(torch.relu(self.square(x)))  # used twice in the graph
            return self.out(h) + self.tied(h)

    model = Twice()
    names = [n for n, _ in model.named_parameters()]
    assert "tied.weight" not in names
    layout, fakes = split_layout(model, {"ps-out": ["out.weight", "out.bias", "tied.bias"],
                                         "ps-square": ["square.weight", "square.bias"]})
    servers = server_set(model, layout, fakes)
    push = BackwardPush(servers, dict(model.named_parameters()), {})
    _, grads, in_flight = push.gradients(lambda: gradients(model, *batch()), 5, "r-1")
    assert sorted(in_flight.during_backward) == ["ps-out", "ps-square"]
    in_flight.finish(grads)  # raises if what was pushed differs from the final gradients
    reference = Twice()
    _, expected = gradients(reference, *batch())
    for fake in fakes.values():
        ((_, share),) = fake.pushes
        for name, value in share.items():
            assert torch.equal(value, expected[name]), name
    push.close()
    servers.close()


def test_a_server_whose_parameter_got_no_gradient_pushes_after_backward():
    model = TwoLayers()
    model.spare = nn.Parameter(torch.zeros(2))  # requires grad, never used
    layout, fakes = split_layout(model, {"ps-a": ["last.weight", "last.bias", "first.weight", "first.bias"],
                                         "ps-b": ["spare"]})
    servers = server_set(model, layout, fakes)
    push = BackwardPush(servers, dict(model.named_parameters()), {})
    _, grads, in_flight = push.gradients(lambda: gradients(model, *batch()), 5, "r-1")
    assert in_flight.during_backward == ["ps-a"]
    assert fakes["ps-b"].pushes == []
    in_flight.finish(grads)
    assert [share for _, share in fakes["ps-b"].pushes] == [{}]  # as push_pull sends it: nothing
    push.close()
    servers.close()


def test_a_failed_overlapped_push_is_retried_with_the_same_id_and_gradients_and_installs_nothing():
    model = TwoLayers()
    layout, fakes = split_layout(model, {"ps-last": ["last.weight", "last.bias"],
                                         "ps-first": ["first.weight", "first.bias"]})
    servers = server_set(model, layout, fakes)
    push = BackwardPush(servers, dict(model.named_parameters()), {})
    fakes["ps-first"].fail_next = True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, grads, in_flight = push.gradients(lambda: gradients(model, *batch()), 5, "r-7")
    with pytest.raises(Unavailable):
        in_flight.finish(grads)
    for name, value in before.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    servers.push_pull(5, grads, "r-7")  # what the agent does next: the same push, same id
    for fake in fakes.values():
        (first_id, first), (second_id, second) = fake.pushes
        assert first_id == second_id == "r-7"
        assert first.keys() == second.keys()
        assert all(torch.equal(first[n], second[n]) for n in first)
    assert torch.equal(dict(model.named_parameters())["first.bias"], torch.full((8,), 2.0))
    push.close()
    servers.close()


def test_a_buffer_change_travels_with_the_first_push_and_equals_the_trainers():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    params = dict(model.named_parameters())
    buffers = {n: b for n, b in model.named_buffers()}
    specs = [TensorSpec(n, p.dtype, tuple(p.shape)) for n, p in params.items()]
    specs += [TensorSpec(n, b.dtype, tuple(b.shape), kind=TensorKind.BUFFER) for n, b in buffers.items()]
    fake = FakeServer([s for s in specs if s.kind is TensorKind.PARAMETER], 0.5)
    layout = LayoutInfo(1, (ServerInfo("ps-0", "127.0.0.1:1", tuple(specs)),))
    member = MemberId("w-0", 1)
    servers = ServerSet({**params, **buffers}, lambda: layout, lambda: member, connect=lambda a: fake)  # type: ignore
    push = BackwardPush(servers, params, buffers)
    old = {n: b.clone() for n, b in buffers.items()}

    def compute():
        loss, grads = gradients(model, *batch())
        for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
            grads[name] = buffers[name] - old[name]
        return loss, grads

    _, grads, in_flight = push.gradients(compute, 5, "r-1")
    assert in_flight.during_backward == ["ps-0"]
    in_flight.finish(grads)
    ((_, share),) = fake.pushes
    assert set(share) == set(grads)
    assert torch.equal(share["1.running_mean"], grads["1.running_mean"])
    push.close()
    servers.close()


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"accumulate": 2}, "accumulate=2"),
        ({"clip_grad_norm": 1.0}, "clip_grad_norm"),
        ({"precision": "fp16"}, "fp16"),
        ({"sparse": frozenset({"embedding.weight"})}, "row-sparse"),
        ({"device": torch.device("cuda", 0)}, "cuda"),
    ],
)
def test_overlap_is_off_where_it_would_not_push_what_the_worker_pushes_after_backward(settings, reason):
    base = {"accumulate": 1, "clip_grad_norm": 0.0, "precision": "fp32", "sparse": frozenset(), "device": CPU}
    assert blocker(**base) is None
    assert blocker(**{"precision": "bf16", **{k: v for k, v in base.items() if k != "precision"}}) is None
    found = blocker(**{**base, **settings})
    assert found is not None and reason in found


def test_prefetched_makes_the_next_batch_while_the_current_one_is_used():
    made: list[int] = []
    closed = threading.Event()
    advanced = threading.Condition()

    def source():
        try:
            for i in range(5):
                with advanced:
                    made.append(i)
                    advanced.notify_all()
                yield i
        finally:
            closed.set()

    with prefetched(source()) as batches:
        first = next(batches)
        with advanced:  # while batch 0 is in hand, batch 1 is made
            assert advanced.wait_for(lambda: len(made) >= 2, DEADLINE_S)
        assert first == 0
        assert list(batches) == [1, 2, 3, 4]
    assert closed.is_set()


def test_prefetched_raises_the_sources_error_and_stops_when_left_early():
    def failing():
        yield 1
        raise ValueError("bad sample")

    with prefetched(failing()) as batches:
        assert next(batches) == 1
        with pytest.raises(ValueError, match="bad sample"):
            next(batches)

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:  # a consumer that leaves early ends it
                yield i
                i += 1
        finally:
            closed.set()

    with prefetched(endless()) as batches:
        assert next(batches) == 0
    assert closed.is_set()


def test_lepton_up_passes_no_overlap_to_every_worker():
    from lepton.config import JobSpec
    from lepton.ops.cli import build_parser
    from lepton.ops.cluster import Cluster

    assert "--no-overlap" not in Cluster(spec=JobSpec(), workers=2).worker_flags("worker-1")
    assert Cluster(spec=JobSpec(), workers=2, overlap=False).worker_flags("worker-1") == ["--no-overlap"]
    assert build_parser().parse_args(["worker", "--coordinator", "127.0.0.1:1", "--no-overlap"]).no_overlap
    assert not build_parser().parse_args(["up"]).no_overlap
