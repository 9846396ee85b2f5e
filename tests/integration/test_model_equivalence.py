"""Users' own models train through real parameter servers exactly as torch.optim trains them.

Two sync parameter servers (real gRPC servers on 127.0.0.1:0, holding the layout's cut of the
model: parameters, frozen ones and buffers, with their kinds) and two worker threads that train
with the worker's own ``Trainer`` and data path (``worker.dataplane.ServerSet``): their pushes are
what ``Trainer.gradients`` produces (no gradient for a frozen parameter or an unused branch, a
buffer's change), against one process running ``torch.optim`` on the union of the
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

from lepton.clients import MemberId, ParameterClient
from lepton.config import JobSpec
from lepton.tensors import assemble
from lepton.workloads import build_model, load_workload, take, tensor_kinds
from support import ServedShard, layout_info, serve_layout, stop_shards, wait_until
from worker.dataplane import ServerSet
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


@pytest.fixture
def cluster(request) -> Iterator[tuple[JobSpec, list[ServedShard]]]:
    """Two sync servers holding the model's tensors as the coordinator lays them out, with kinds."""
    spec = job(*request.param)
    model = build_model(spec.model, load_workload(spec.dataset, spec.seed), spec.seed)
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}
    served = serve_layout(
        initial, SERVERS, spec.optimizer, spec.lr, spec.optimizer_kwargs, WORKERS, step_timeout_s=CALL_TIMEOUT_S,
        kinds=tensor_kinds(model),
    )
    try:
        yield spec, served
    finally:
        stop_shards(served)


class Worker:
    """A model replica in the worker's own Trainer and the worker's own data path
    (``worker.dataplane.ServerSet``), which pushes each server its share of what
    ``Trainer.gradients`` returns, as the worker's agent does."""

    def __init__(self, index: int, spec: JobSpec, served: list[ServedShard]) -> None:
        self.index = index
        self.member = MemberId(f"w-{index}", 1)
        self.trainer = Trainer(spec)
        layout = layout_info(served)
        self.servers = ServerSet(
            self.trainer.tensors, lambda: layout, lambda: self.member,
            connect=lambda address: ParameterClient(address, timeout_s=CALL_TIMEOUT_S),
        )
        self.pushed: dict[int, dict[str, torch.Tensor]] = {}  # step -> what this worker pushed

    def close(self) -> None:
        self.servers.close()

    def pull(self) -> None:
        self.servers.pull_all()

    def step(self, step: int) -> None:
        _, grads = self.trainer.gradients(batch_indices(step, self.index))
        self.pushed[step] = {n: g.clone() for n, g in grads.items()}
        samples = BATCH_SIZES[self.index]
        replies = self.servers.push_pull(samples, grads, request_id=f"{self.member}-{step}", timeout_s=CALL_TIMEOUT_S)
        for server_id, reply in replies.items():
            version = self.servers.versions[server_id]
            assert reply.applied and version == step + 1, f"{self.member} step {step}: {reply}"


def train(spec: JobSpec, served: list[ServedShard]) -> list[Worker]:
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


def server_state(served: list[ServedShard]) -> dict[str, torch.Tensor]:
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
