"""Sparse embeddings through real parameter servers match single-process PyTorch.

A model with an ``nn.EmbeddingBag(sparse=True)`` table and a dense classifier is trained in
``sync`` mode by N worker threads through M parameter servers (real gRPC servers on 127.0.0.1:0
holding the layout's slices: with 3 servers the table is cut into row slices). Workers pull only the
rows their batch reads (``RowSelection``) plus the dense tensors, and push row-sparse gradients. One
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

from coordinator.layout import balance
from lepton.clients import MemberId, ParameterClient
from lepton.optimizers import build_sparse_aware_optimizer
from lepton.tensors import TensorSpec, assemble, part, rows_in, sparse_part
from support import serve_share, wait_until

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
def cluster(request) -> Iterator[tuple[list, list[TensorSpec]]]:
    optimizer, workers, count = request.param
    name, lr, kwargs = OPTIMIZERS[optimizer]
    initial = {n: p.detach().clone() for n, p in Model().named_parameters()}
    specs = [TensorSpec(n, t.dtype, tuple(t.shape), sparse=n in SPARSE) for n, t in initial.items()]
    layout = balance(specs, [f"ps-{i}" for i in range(count)], 1)
    served = []
    try:
        for member_id in layout.servers:
            held = layout.tensors_of(member_id)
            node, server = serve_share(member_id, held, initial, name, lr, kwargs, workers, CALL_TIMEOUT_S)
            served.append((node, server, held))
        yield served, list(layout.tensors)
    finally:
        for _, server, _ in served:
            server.stop(0)


class Worker:
    def __init__(self, index: int, served: list) -> None:
        self.index = index
        self.member = MemberId(f"w-{index}", 1)
        self.model = Model()
        self.params = dict(self.model.named_parameters())
        self.served = served
        self.clients = [ParameterClient(server.address, timeout_s=CALL_TIMEOUT_S) for _, server, _ in served]
        self.pool = ThreadPoolExecutor(max_workers=len(served))

    def close(self) -> None:
        self.pool.shutdown()
        for c in self.clients:
            c.close()

    def pull(self, tokens: torch.Tensor) -> int:
        """The dense tensors whole, of the table only the rows ``tokens`` read; returns the version."""
        touched = torch.unique(tokens)
        with torch.no_grad():
            self.params["embedding.weight"].fill_(float("nan"))  # rows not pulled must not be read

        def pull(i: int):
            held = self.served[i][2]
            rows = {t.name: rows_in(t, touched) for t in held if t.sparse}
            rows = {n: r for n, r in rows.items() if r.numel()}
            names = [t.name for t in held if not t.sparse]
            if not rows and not names:
                return None, {}, held, rows
            version, tensors = self.clients[i].pull(self.member, names, rows)
            return version, tensors, held, rows

        versions = set()
        with torch.no_grad():
            for version, tensors, held, rows in self.pool.map(pull, range(len(self.clients))):
                if version is None:
                    continue
                versions.add(version)
                for t in held:
                    if t.name in rows:
                        self.params[t.of].index_copy_(0, rows[t.name] + t.row_offset, tensors[t.name])
                    elif t.name in tensors:
                        part(self.params, t).copy_(tensors[t.name])
        assert len(versions) == 1, versions
        return versions.pop()

    def step(self, step: int) -> None:
        tokens, labels = batch(step, self.index)
        assert self.pull(tokens) == step
        self.model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(tokens), labels).backward()
        grads = {n: p.grad for n, p in self.params.items()}
        assert grads["embedding.weight"].is_sparse

        def push(i: int):
            held = self.served[i][2]
            share = {t.name: sparse_part(grads[t.of], t) if t.sparse else part(grads, t) for t in held}
            return self.clients[i].push_pull(
                self.member, step, len(labels), share, timeout_s=CALL_TIMEOUT_S, request_id=f"{self.member}-{step}"
            )

        for reply, _, _ in self.pool.map(push, range(len(self.clients))):
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
                wait_until(lambda: all(node.gate.participants == everyone for node, _, _ in served),
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
    for node, _, _ in served:
        version, tensors = node.gate.snapshot()
        assert version == FULL_STEPS + 1
        pieces.update(tensors)
        status = node.status()
        assert status.steps_timed_out == 0
    assert any(t.is_slice for t in specs) == (count > 1)
    got = assemble(specs, pieces)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # rows travelled, not the table: every push carried fewer bytes than the whole table
    pushes = 1 + FULL_STEPS * workers
    assert sum(node.status().bytes_pushed for node, _, _ in served) < pushes * table_bytes
