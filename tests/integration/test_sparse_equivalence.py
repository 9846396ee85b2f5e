"""Sparse embeddings through real parameter servers match single-process PyTorch.

A model with an ``nn.EmbeddingBag(sparse=True)`` table and a dense classifier is trained in
``sync`` mode by N worker threads through M parameter servers (real gRPC servers on 127.0.0.1:0
holding the layout's slices: with 3 servers the table is cut into row slices). Workers train through
the worker's own data path (``worker.dataplane.ServerSet``): they pull only the rows their batch
reads (``RowSelection``) plus the dense tensors when stale, and push row-sparse gradients. One
process trains the same model with ``build_sparse_aware_optimizer`` (SGD and Adagrad as torch
applies sparse gradients, Adam as SparseAdam on the table) on the union of each step's batches.
Parameters must agree to rtol 1e-5, atol 1e-6, and the servers must have received rows, never the
whole table.

As in test_equivalence.py, worker 0 trains a join step alone; every later step has all N workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from lepton.clients import MemberId, ParameterClient
from lepton.optimizers import build_sparse_aware_optimizer
from lepton.tensors import TensorSpec, assemble
from support import ServedShard, layout_info, serve_layout, stop_shards, wait_until
from worker.dataplane import ServerSet

VOCAB, DIM, CLASSES, DOC_LEN = 60, 4, 3, 5
FULL_STEPS = 4
BATCH_SIZES = (3, 5, 4)
CALL_TIMEOUT_S = 30.0
OPTIMIZERS = {
    "sgd-momentum": ("sgd", 0.5, {"momentum": 0.9}),
    "adagrad": ("adagrad", 0.3, {}),
    "adam": ("adam", 0.05, {}),
}
SPARSE = {"embedding.weight"}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(77)
        self.embedding = nn.EmbeddingBag(VOCAB, DIM, mode="mean", sparse=True)
        self.classifier = nn.Linear(DIM, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(tokens))


def batch(step: int, worker: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids drawn from the low half of the vocabulary mostly, so some rows (and, with 3
    servers, whole slices) stay untouched in a step."""
    g = torch.Generator().manual_seed(500 + 10 * step + worker)
    n = BATCH_SIZES[worker]
    tokens = torch.randint(0, VOCAB // 2, (n, DOC_LEN), generator=g)
    tokens[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    return tokens, torch.randint(0, CLASSES, (n,), generator=g)


def step_workers(step: int, workers: int) -> list[int]:
    return [0] if step == 0 else list(range(workers))


def reference(optimizer: str, workers: int) -> dict[str, torch.Tensor]:
    name, lr, kwargs = OPTIMIZERS[optimizer]
    model = Model()
    opt = build_sparse_aware_optimizer(model.named_parameters(), SPARSE, name, lr, kwargs)
    for step in range(FULL_STEPS + 1):
        samples = [batch(step, w) for w in step_workers(step, workers)]
        x = torch.cat([s[0] for s in samples])
        y = torch.cat([s[1] for s in samples])
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def cluster(request) -> Iterator[tuple[list[ServedShard], list[TensorSpec]]]:
    optimizer, workers, count = request.param
    name, lr, kwargs = OPTIMIZERS[optimizer]
    initial = {n: p.detach().clone() for n, p in Model().named_parameters()}
    served = serve_layout(initial, count, name, lr, kwargs, workers, step_timeout_s=CALL_TIMEOUT_S, sparse=SPARSE)
    try:
        yield served, [t for shard in served for t in shard.specs]
    finally:
        stop_shards(served)


class Worker:
    """A model replica and the worker's own data path (``worker.dataplane.ServerSet``): it pulls
    the rows a batch reads and pushes row-sparse gradients as the worker's agent does."""

    def __init__(self, index: int, served: list[ServedShard]) -> None:
        self.index = index
        self.member = MemberId(f"w-{index}", 1)
        self.model = Model()
        self.params = dict(self.model.named_parameters())
        layout = layout_info(served)
        self.servers = ServerSet(
            self.params, lambda: layout, lambda: self.member,
            connect=lambda address: ParameterClient(address, timeout_s=CALL_TIMEOUT_S),
        )

    def close(self) -> None:
        self.servers.close()

    def pull(self, tokens: torch.Tensor) -> int:
        """Of the table only the rows ``tokens`` read (and the dense tensors, unless the last
        answers brought them); returns the version."""
        with torch.no_grad():
            self.params["embedding.weight"].fill_(float("nan"))  # rows not pulled must not be read
        self.servers.pull_rows({"embedding.weight": torch.unique(tokens)})
        versions = set(self.servers.versions.values())
        assert len(versions) == 1, versions
        return versions.pop()

    def step(self, step: int) -> None:
        tokens, labels = batch(step, self.index)
        assert self.pull(tokens) == step
        self.model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(tokens), labels).backward()
        grads = {n: p.grad for n, p in self.params.items()}
        assert grads["embedding.weight"].is_sparse

        replies = self.servers.push_pull(
            len(labels), grads, request_id=f"{self.member}-{step}", timeout_s=CALL_TIMEOUT_S
        )
        for reply in replies.values():
            assert reply.applied and reply.version == step + 1, reply


COMBINATIONS = [
    pytest.param((optimizer, workers, servers), id=f"{optimizer}-{workers}workers-{servers}servers")
    for optimizer in OPTIMIZERS
    for workers in (1, 3)
    for servers in (1, 3)
]


@pytest.mark.parametrize("cluster", COMBINATIONS, indirect=True)
def test_sparse_sync_training_through_parameter_servers_equals_torch(cluster, request):
    optimizer, workers, count = request.node.callspec.params["cluster"]
    served, specs = cluster
    team = [Worker(i, served) for i in range(workers)]
    everyone = {w.member.member_id for w in team}
    try:
        team[0].step(0)

        def run(worker: Worker) -> None:
            if worker.index == 0:
                wait_until(lambda: all(shard.node.gate.participants == everyone for shard in served),
                           CALL_TIMEOUT_S, "every worker to join step 1 on every server")
            else:
                # joining: a pull makes the worker known; its first push makes it a participant
                worker.pull(batch(1, worker.index)[0])
            for step in range(1, FULL_STEPS + 1):
                worker.step(step)

        # workers other than 0 join by pushing step 1; worker 0 waits for them (see above)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for done in [pool.submit(run, w) for w in team]:
                done.result()
    finally:
        for w in team:
            w.close()

    expected = reference(optimizer, workers)
    pieces = {}
    table_bytes = VOCAB * DIM * 4
    for shard in served:
        version, tensors = shard.node.gate.snapshot()
        assert version == FULL_STEPS + 1
        pieces.update(tensors)
        status = shard.node.status()
        assert status.steps_timed_out == 0
    assert any(t.is_slice for t in specs) == (count > 1)
    got = assemble(specs, pieces)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # rows travelled, not the table: every push carried fewer bytes than the whole table
    pushes = 1 + FULL_STEPS * workers
    assert sum(shard.node.status().bytes_pushed for shard in served) < pushes * table_bytes
