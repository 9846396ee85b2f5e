"""Sync training through real parameter servers matches plain PyTorch on the union of the batches.

M parameter servers (real gRPC servers on 127.0.0.1:0, each holding its share of the model as
the coordinator's layout cuts it: with 3 servers a weight matrix is split into row slices held by
different servers) and N worker threads that pull and push through the worker's own data path
(``worker.dataplane.ServerSet``: a ``ParameterClient.push_pull`` per server), against one process
running ``torch.optim`` on the concatenation of the same batches with the mean loss. The servers
weight each per-batch mean-loss gradient by its sample count, and the sample-weighted mean of
per-batch means is the gradient of the mean over the union, so the two must agree to rounding.

A sync worker becomes a participant by pushing, and a step closes as soon as every participant has
pushed. So before the first step nobody waits for anybody: the first push closes step 0 alone.
The run therefore opens with a join step that worker 0 trains alone (the reference does the same);
worker 0 pushes its first full step only once every server counts all N workers as participants,
and from then on every step closes with all N batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from lepton.clients import MemberId, ParameterClient
from lepton.tensors import assemble
from lepton.workloads import model_tensors
from support import ServedShard, layout_info, serve_layout, stop_shards, wait_until
from worker.dataplane import ServerSet

FULL_STEPS = 5
BATCH_SIZES = (4, 6, 8)  # worker i trains batches of BATCH_SIZES[i] samples
IN_FEATURES, HIDDEN, CLASSES = 8, 16, 4
MODEL_SEED = 1234
CALL_TIMEOUT_S = 30.0
OPTIMIZERS = {
    "sgd-momentum": ("sgd", 0.1, {"momentum": 0.9}),
    "adam": ("adam", 0.01, {}),
}


def make_model() -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def batch(step: int, worker: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples worker ``worker`` trains at ``step``: fixed by (step, worker), distinct for each."""
    generator = torch.Generator().manual_seed(10_000 + 100 * step + worker)
    n = BATCH_SIZES[worker]
    return torch.randn(n, IN_FEATURES, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator)


def step_workers(step: int, workers: int) -> list[int]:
    """Who trains at ``step``: worker 0 alone in the join step, then everyone."""
    return [0] if step == 0 else list(range(workers))


def mean_loss_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def reference_parameters(optimizer: str, workers: int) -> dict[str, torch.Tensor]:
    """One process, plain torch.optim, mean loss over the union of each step's batches."""
    name, lr, kwargs = OPTIMIZERS[optimizer]
    model = make_model()
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]
    opt = cls(model.parameters(), lr=lr, **kwargs)
    for step in range(FULL_STEPS + 1):
        samples = [batch(step, w) for w in step_workers(step, workers)]
        x = torch.cat([s[0] for s in samples])
        y = torch.cat([s[1] for s in samples])
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def servers(request) -> Iterator[list[ServedShard]]:
    """M sync parameter servers on 127.0.0.1:0 holding the model's initial values as
    ``coordinator.layout.balance`` cuts them (row slices where a range boundary falls inside a
    parameter); every worker identity w-0..w-(N-1) is live on each."""
    optimizer, workers, count = request.param
    name, lr, kwargs = OPTIMIZERS[optimizer]
    initial = {n: p.detach().clone() for n, p in make_model().named_parameters()}
    shards = serve_layout(initial, count, name, lr, kwargs, workers, step_timeout_s=CALL_TIMEOUT_S)
    try:
        for shard in shards:
            assert shard.specs, f"{shard.member_id} holds no tensor"
        yield shards
    finally:
        stop_shards(shards)


class Worker:
    """One worker: a model replica and the worker's own data path (``worker.dataplane.ServerSet``),
    which pushes each server its share at once (a step closes on a server only when every
    participant has pushed there) and installs the answers."""

    def __init__(self, index: int, shards: list[ServedShard]) -> None:
        self.index = index
        self.member = MemberId(f"w-{index}", 1)
        self.model = make_model()
        layout = layout_info(shards)
        self.servers = ServerSet(
            model_tensors(self.model), lambda: layout, lambda: self.member,
            connect=lambda address: ParameterClient(address, timeout_s=CALL_TIMEOUT_S),
        )
        self.version = -1

    def close(self) -> None:
        self.servers.close()

    def _agreed(self) -> None:
        versions = list(self.servers.versions.values())
        assert len(set(versions)) == 1, f"servers disagree on the version: {versions}"
        self.version = versions[0]

    def pull(self) -> None:
        self.servers.pull_all()
        self._agreed()

    def step(self, step: int) -> None:
        assert self.version == step, f"{self.member} computes step {step} from version {self.version}"
        grads = mean_loss_gradients(self.model, *batch(step, self.index))
        samples = BATCH_SIZES[self.index]
        replies = self.servers.push_pull(samples, grads, request_id=f"{self.member}-{step}", timeout_s=CALL_TIMEOUT_S)
        for reply in replies.values():
            assert reply.applied and reply.version == step + 1, f"{self.member} step {step}: {reply}"
        self._agreed()


def train_through_servers(shards: list[ServedShard], workers: int) -> None:
    """The join step by worker 0, then FULL_STEPS steps of all workers, each on its own thread."""
    team = [Worker(i, shards) for i in range(workers)]
    everyone = {w.member.member_id for w in team}
    try:
        team[0].pull()
        team[0].step(0)

        def run(worker: Worker) -> None:
            if worker.index == 0:
                # Worker 0 is a participant already: pushing before the others have joined would
                # close step 1 without them.
                wait_until(
                    lambda: all(s.node.gate.participants == everyone for s in shards), CALL_TIMEOUT_S,
                    "every worker to join step 1 on every server",
                )
            else:
                worker.pull()
            for step in range(1, FULL_STEPS + 1):
                worker.step(step)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="worker") as pool:
            for done in [pool.submit(run, w) for w in team]:
                done.result()
    finally:
        for worker in team:
            worker.close()


COMBINATIONS = [
    pytest.param((optimizer, workers, servers), id=f"{optimizer}-{workers}workers-{servers}servers")
    for optimizer in OPTIMIZERS
    for workers in (1, 3)
    for servers in (1, 3)
] + [
    # "with 1 to 8 servers the same job gives the same result": the layout cuts finer, the
    # parameters stay those of the single process
    pytest.param(("adam", 3, servers), id=f"adam-3workers-{servers}servers")
    for servers in (2, 5, 8)
]


@pytest.mark.parametrize("servers", COMBINATIONS, indirect=True)
def test_sync_training_through_parameter_servers_equals_torch_on_the_union_of_batches(
    servers, request, record_property
):
    optimizer, workers, count = request.node.callspec.params["servers"]
    train_through_servers(servers, workers)

    expected = reference_parameters(optimizer, workers)
    pieces: dict[str, torch.Tensor] = {}
    for shard in servers:
        version, tensors = shard.node.gate.snapshot()
        assert version == FULL_STEPS + 1
        assert shard.node.status().steps_timed_out == 0
        pieces.update(tensors)
    specs = [t for shard in servers for t in shard.specs]
    assert any(t.is_slice for t in specs) == (count > 1), [t.name for t in specs]
    got = assemble(specs, pieces)
    assert sorted(got) == sorted(expected)
    record_property("max_abs_diff", max(float((got[n] - expected[n]).abs().max()) for n in expected))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
