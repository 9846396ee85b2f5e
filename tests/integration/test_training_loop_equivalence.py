"""Gradient accumulation, clipping by global norm and lr warmup in sync mode equal single-process
torch doing the same.

Real sync parameter servers on 127.0.0.1:0 (the layout cuts the model into row slices across
them) and worker threads that train with the worker's own ``Trainer`` (micro-batches, clipping)
and data path (``worker.dataplane.ServerSet``); the servers run the job's schedule with warmup.
The reference is one process with torch.optim: per step, every micro-batch's loss weighted by its
share of the step's samples and backpropagated into the same ``.grad`` (torch's accumulation
idiom), ``torch.nn.utils.clip_grad_norm_`` over the whole model, and the warmed-up schedule's
rate written into the optimizer. As in test_equivalence.py, worker 0 trains a join step alone.

Clipping happens in the worker before it pushes (the norm is the whole model's, which no server
sees): with several workers each clips its own gradient and the servers average the clipped ones,
so for them the reference clips each worker's gradient before the sample-weighted mean.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lepton.clients import MemberId, ParameterClient
from lepton.config import JobSpec
from lepton.tensors import assemble
from lepton.workloads import load_workload, take, tensor_kinds
from support import layout_info, serve_layout, stop_shards, wait_until
from worker.dataplane import ServerSet
from worker.trainer import Trainer

FULL_STEPS = 5
BATCH_SIZE = 8
CALL_TIMEOUT_S = 30.0
DATASET = "integration.custom_workload:blobs"


@dataclass(frozen=True)
class Case:
    workers: int
    servers: int
    optimizer: tuple[str, float, dict]
    accumulate: int = 1
    clip: float = 0.0
    warmup: int = 0
    t_max: int = 0  # cosine schedule over this many updates (0: constant)


ADAM = ("adam", 0.01, {})
SGD = ("sgd", 0.1, {"momentum": 0.9})
CASES = {
    "accumulate-3workers-2servers": Case(3, 2, ADAM, accumulate=3),
    "clip-1worker-3servers": Case(1, 3, SGD, clip=0.5),
    "clip-2workers-3servers": Case(2, 3, SGD, clip=0.5),
    "warmup-cosine-3workers-3servers": Case(3, 3, ADAM, warmup=3, t_max=8),
    "all-1worker-3servers": Case(1, 3, SGD, accumulate=2, clip=0.5, warmup=2, t_max=6),
}


def job(case: Case) -> JobSpec:
    name, lr, kwargs = case.optimizer
    schedule = {"lr_schedule": "cosine", "lr_schedule_kwargs": {"t_max": case.t_max}} if case.t_max else {}
    return JobSpec(
        dataset=DATASET, model="mlp", optimizer=name, lr=lr, optimizer_kwargs=kwargs, mode="sync", seed=3,
        batch_size=BATCH_SIZE, accumulate=case.accumulate, clip_grad_norm=case.clip, warmup_steps=case.warmup,
        device="cpu", **schedule,
    )


def step_indices(case: Case, step: int, worker: int) -> torch.Tensor:
    """What worker ``worker`` trains at ``step``: ``accumulate`` batches, the last one short by
    ``worker`` samples (micro-batches of unequal size)."""
    generator = torch.Generator().manual_seed(700 + 10 * step + worker)
    count = max(1, case.accumulate * BATCH_SIZE - worker * (1 + BATCH_SIZE // 3))
    return torch.randperm(500, generator=generator)[:count]


def step_workers(case: Case, step: int) -> list[int]:
    return [0] if step == 0 else list(range(case.workers))


def warmed_up_lr(case: Case, update: int) -> float:
    lr = case.optimizer[1]
    if case.t_max:
        lr *= (1 + math.cos(math.pi * update / case.t_max)) / 2
    return lr * min(1.0, (update + 1) / (case.warmup + 1))


def reference_state(case: Case) -> dict[str, torch.Tensor]:
    spec = job(case)
    workload = load_workload(spec.dataset, spec.seed)
    model = Trainer(spec).model  # the job's initial model; everything below is plain torch
    params = list(model.parameters())
    name, lr, kwargs = case.optimizer
    opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name](params, lr=lr, **kwargs)

    def accumulate(indices: torch.Tensor, total: int) -> None:
        for micro in torch.split(indices, BATCH_SIZE):
            x, y = take(workload.train, micro)
            (nn.functional.cross_entropy(model(x), y) * (len(micro) / total)).backward()

    for step in range(FULL_STEPS + 1):
        team = [step_indices(case, step, w) for w in step_workers(case, step)]
        total = sum(len(i) for i in team)
        opt.zero_grad(set_to_none=True)
        if not case.clip:
            for indices in team:
                accumulate(indices, total)
        else:
            mean = [torch.zeros_like(p) for p in params]
            for indices in team:
                opt.zero_grad(set_to_none=True)
                accumulate(indices, len(indices))
                torch.nn.utils.clip_grad_norm_(params, case.clip)
                for m, p in zip(mean, params, strict=True):
                    m += p.grad * (len(indices) / total)
            for m, p in zip(mean, params, strict=True):
                p.grad = m
        for group in opt.param_groups:
            group["lr"] = warmed_up_lr(case, step)
        opt.step()
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


class Worker:
    def __init__(self, index: int, case: Case, layout) -> None:
        self.index, self.case = index, case
        self.member = MemberId(f"w-{index}", 1)
        self.trainer = Trainer(job(case))
        self.servers = ServerSet(
            self.trainer.tensors, lambda: layout, lambda: self.member,
            connect=lambda address: ParameterClient(address, timeout_s=CALL_TIMEOUT_S),
        )
        self.norms: list[float] = []

    def step(self, step: int) -> None:
        indices = step_indices(self.case, step, self.index)
        _, grads = self.trainer.gradients(indices)
        assert grads is not None
        if self.trainer.last_grad_norm is not None:
            self.norms.append(self.trainer.last_grad_norm)
        replies = self.servers.push_pull(len(indices), grads, f"{self.member}-{step}", timeout_s=CALL_TIMEOUT_S)
        for server_id, reply in replies.items():
            assert reply.applied and self.servers.versions[server_id] == step + 1, f"{self.member} step {step}: {reply}"


@pytest.mark.parametrize("name", list(CASES))
def test_sync_training_loop_features_equal_single_process_torch(name):
    case = CASES[name]
    spec = job(case)
    model = Trainer(spec).model
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}
    load_options = {"warmup_steps": case.warmup}
    if case.t_max:
        load_options.update(lr_schedule="cosine", lr_schedule_kwargs={"t_max": case.t_max})
    served = serve_layout(
        initial, case.servers, spec.optimizer, spec.lr, spec.optimizer_kwargs, case.workers,
        step_timeout_s=CALL_TIMEOUT_S, kinds=tensor_kinds(model), load_options=load_options,
    )
    try:
        assert any(t.is_slice for s in served for t in s.specs) == (case.servers > 1)
        layout = layout_info(served)
        team = [Worker(i, case, layout) for i in range(case.workers)]
        everyone = {w.member.member_id for w in team}
        try:
            team[0].servers.pull_all()
            team[0].step(0)

            def run(worker: Worker) -> None:
                if worker.index == 0:
                    wait_until(lambda: all(s.node.gate.participants == everyone for s in served), CALL_TIMEOUT_S,
                               "every worker to join step 1 on every server")
                else:
                    worker.servers.pull_all()
                for step in range(1, FULL_STEPS + 1):
                    worker.step(step)

            with ThreadPoolExecutor(max_workers=case.workers) as pool:
                for done in [pool.submit(run, w) for w in team]:
                    done.result()
        finally:
            for worker in team:
                worker.servers.close()
        specs = [t for s in served for t in s.specs]
        got = assemble(specs, {n: t for s in served for n, t in s.node.gate.snapshot()[1]})
        lrs = [s.node.gate.store.lr for s in served]
    finally:
        stop_shards(served)

    if case.clip:  # clipping did something: some whole-model norms were above the limit
        assert any(n > case.clip for w in team for n in w.norms), [w.norms for w in team]
    assert lrs == [pytest.approx(warmed_up_lr(case, FULL_STEPS + 1), rel=1e-9)] * case.servers  # the next update's
    expected = reference_state(case)
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=key: f"{n}: {m}")


def test_a_worker_without_accumulation_pushes_what_it_pushed_before():
    """accumulate=1 and no clipping: one forward and backward over the batch, bit for bit."""
    spec = job(Case(1, 1, ADAM))
    trainer = Trainer(spec)
    indices = torch.arange(BATCH_SIZE)
    _, grads = trainer.gradients(indices)
    model = Trainer(spec).model
    x, y = take(trainer.workload.train, indices)
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert torch.equal(grads[name], p.grad), name
