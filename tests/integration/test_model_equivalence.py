"""Users' own models train through real parameter servers exactly as torch.optim trains them.

Two sync parameter servers (real gRPC servers on 127.0.0.1:0, holding the layout's cut of the
model: parameters, frozen ones and buffers, with their kinds) and two worker threads whose pushes
are what the worker's own ``Trainer.gradients`` produces (no gradient for a frozen parameter or an
unused branch, a buffer's change), against one process running ``torch.optim`` on the union of the
same batches. As in test_equivalence.py, worker 0 trains a join step alone first.

A BatchNorm model is not equivalent to the union batch (each worker normalises by its own batch, as
DDP without SyncBatchNorm does); for it the test checks the buffer rule instead: the servers'
running mean moves by the sample-weighted mean of the workers' changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from coordinator.layout import balance
from lepton.clients import MemberId, ParameterClient
from lepton.config import JobSpec
from lepton.rpc import Server
from lepton.tensors import TensorSpec, assemble, part
from lepton.workloads import build_model, load_workload, take, tensor_kinds
from ps_server.parameter_server import ParameterServer
from support import serve_share, wait_until
from worker.trainer import Trainer

WORKERS, SERVERS = 2, 2
FULL_STEPS = 6
BATCH_SIZES = (8, 12)
CALL_TIMEOUT_S = 30.0
DATASET = "integration.custom_workload:blobs"
OPTIMIZERS = {
    "adamw": ("adamw", 0.01, {"weight_decay": 0.1}),
    "sgd-momentum-wd": ("sgd", 0.1, {"momentum": 0.9, "weight_decay": 0.01}),
}
MODELS = {
    "frozen-layer": "integration.custom_workload:frozen_first_layer",
    "unused-branch": "integration.custom_workload:unused_branch",
}


def job(model: str, optimizer: str) -> JobSpec:
    name, lr, kwargs = OPTIMIZERS[optimizer]
    return JobSpec(dataset=DATASET, model=model, optimizer=name, lr=lr, optimizer_kwargs=kwargs, mode="sync", seed=7)


def batch_indices(step: int, worker: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(500 + 10 * step + worker)
    return torch.randperm(500, generator=generator)[: BATCH_SIZES[worker]]


def step_workers(step: int) -> list[int]:
    return [0] if step == 0 else list(range(WORKERS))


def reference_state(spec: JobSpec) -> dict[str, torch.Tensor]:
    """One process, plain torch.optim over the parameters that require grad, mean loss over the
    union of each step's batches."""
    workload = load_workload(spec.dataset, spec.seed)
    model = build_model(spec.model, workload, spec.seed)
    cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[spec.optimizer]
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=spec.lr, **spec.optimizer_kwargs)
    for step in range(FULL_STEPS + 1):
        x, y = take(workload.train, torch.cat([batch_indices(step, w) for w in step_workers(step)]))
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


class Served:
    def __init__(self, member_id: str, node: ParameterServer, server: Server, specs) -> None:
        self.member_id, self.node, self.server, self.specs = member_id, node, server, specs


@pytest.fixture
def cluster(request) -> Iterator[tuple[JobSpec, list[Served]]]:
    """Two sync servers holding the model's tensors as the coordinator lays them out, with kinds."""
    spec = job(*request.param)
    model = build_model(spec.model, load_workload(spec.dataset, spec.seed), spec.seed)
    kinds = tensor_kinds(model)
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}
    ids = [f"ps-{i}" for i in range(SERVERS)]
    layout = balance([TensorSpec(n, t.dtype, tuple(t.shape), kind=kinds[n]) for n, t in initial.items()], ids, 1)
    served = []
    try:
        for member_id in ids:
            specs = layout.tensors_of(member_id)
            node, server = serve_share(
                member_id, specs, initial, spec.optimizer, spec.lr, spec.optimizer_kwargs, WORKERS, CALL_TIMEOUT_S
            )
            served.append(Served(member_id, node, server, specs))
        yield spec, served
    finally:
        for s in served:
            s.server.stop(0)


class Worker:
    """A model replica in the worker's own Trainer; pushes each server the share of what
    ``Trainer.gradients`` returns that it holds, as the worker's agent does."""

    def __init__(self, index: int, spec: JobSpec, served: list[Served]) -> None:
        self.index = index
        self.member = MemberId(f"w-{index}", 1)
        self.trainer = Trainer(spec)
        self.served = served
        self.clients = [ParameterClient(s.server.address, timeout_s=CALL_TIMEOUT_S) for s in served]
        self.pool = ThreadPoolExecutor(max_workers=len(served))
        self.specs = {t.name: t for s in served for t in s.specs}
        self.pushed: dict[int, dict[str, torch.Tensor]] = {}  # step -> what this worker pushed

    def close(self) -> None:
        self.pool.shutdown()
        for client in self.clients:
            client.close()

    def pull(self) -> None:
        for _, tensors in self.pool.map(lambda c: c.pull(self.member), self.clients):
            self.trainer.set_parameters(tensors, self.specs)

    def step(self, step: int) -> None:
        _, grads = self.trainer.gradients(batch_indices(step, self.index))
        self.pushed[step] = {n: g.clone() for n, g in grads.items()}
        samples = BATCH_SIZES[self.index]

        def push(i: int):
            share = {t.name: part(grads, t) for t in self.served[i].specs if t.of in grads}
            return self.clients[i].push_pull(
                self.member, step, samples, share, timeout_s=CALL_TIMEOUT_S, request_id=f"{self.member}-{step}"
            )

        for reply, version, tensors in self.pool.map(push, range(len(self.clients))):
            assert reply.applied and version == step + 1, f"{self.member} step {step}: {reply}"
            self.trainer.set_parameters(tensors, self.specs)


def train(spec: JobSpec, served: list[Served]) -> list[Worker]:
    team = [Worker(i, spec, served) for i in range(WORKERS)]
    everyone = {w.member.member_id for w in team}
    team[0].pull()
    team[0].step(0)

    def run(worker: Worker) -> None:
        if worker.index == 0:
            wait_until(lambda: all(s.node.gate.participants == everyone for s in served), CALL_TIMEOUT_S,
                       "every worker to join step 1 on every server")
        else:
            worker.pull()
        for step in range(1, FULL_STEPS + 1):
            worker.step(step)

    try:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            for done in [pool.submit(run, w) for w in team]:
                done.result()
    finally:
        for worker in team:
            worker.close()
    return team


def server_state(served: list[Served]) -> dict[str, torch.Tensor]:
    specs = [t for s in served for t in s.specs]
    values = {name: t for s in served for name, t in s.node.gate.snapshot()[1]}
    return assemble(specs, values)


@pytest.mark.parametrize(
    "cluster",
    [pytest.param((MODELS[m], o), id=f"{m}-{o}") for m in MODELS for o in OPTIMIZERS],
    indirect=True,
)
def test_sync_training_of_a_users_model_equals_torch_optim(cluster):
    spec, served = cluster
    train(spec, served)
    got = server_state(served)
    expected = reference_state(spec)
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    initial = build_model(spec.model, load_workload(spec.dataset, spec.seed), spec.seed).state_dict()
    untouched = {"frozen_first_layer": "features.", "unused_branch": "auxiliary."}[spec.model.split(":")[1]]
    for name in [n for n in got if n.startswith(untouched)]:
        assert torch.equal(got[name], initial[name]), f"{name} moved: weight decay or momentum reached it"


@pytest.mark.parametrize(
    "cluster", [pytest.param(("integration.custom_workload:batchnorm_mlp", "sgd-momentum-wd"), id="batchnorm")],
    indirect=True,
)
def test_batchnorm_running_statistics_move_by_the_weighted_mean_of_the_workers_changes(cluster):
    spec, served = cluster
    team = train(spec, served)
    got = server_state(served)
    initial = build_model(spec.model, load_workload(spec.dataset, spec.seed), spec.seed).state_dict()
    assert got["1.num_batches_tracked"].item() == FULL_STEPS + 1  # one per step, not one per push
    for name in ("1.running_mean", "1.running_var"):
        expected = initial[name].double()
        for step in range(FULL_STEPS + 1):
            pushed = [(BATCH_SIZES[w.index], w.pushed[step][name].double()) for w in team if step in w.pushed]
            expected += sum(n * change for n, change in pushed) / sum(n for n, _ in pushed)
        assert not torch.equal(got[name], initial[name]), f"{name} never moved"
        torch.testing.assert_close(got[name], expected.float(), rtol=1e-5, atol=1e-6)
        for worker in team:  # what every worker evaluates with is what the servers hold
            torch.testing.assert_close(worker.trainer.tensors[name], got[name])
