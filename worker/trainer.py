"""The trainer: the job's model and data, and nothing about the network. The data path
(worker/dataplane.py) writes pulled values into its tensors; the agent asks it for gradients."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lepton.config import JobSpec
from lepton.errors import ConfigError
from lepton.tasks import resolve_loss, resolve_task, shape_target
from lepton.tensors import TensorKind, empty_row_sparse
from lepton.workloads import (
    Evaluation,
    build_model,
    evaluate,
    load_workload,
    model_tensors,
    sparse_parameter_names,
    take,
    tensor_kinds,
)


@dataclass(frozen=True)
class ShardRange:
    epoch: int
    shard: int
    start: int
    end: int
    offset: int


class Trainer:
    """Owns the model replica and the dataset; computes mean-loss gradients of batches."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.workload = load_workload(spec.dataset, spec.seed)
        self.task = resolve_task(spec.task, spec.loss, self.workload.label_dtype)
        self.model = build_model(
            spec.model, self.workload, spec.seed, self.workload.output_dim(self.task, spec.loss)
        )
        self.params: dict[str, nn.Parameter] = dict(self.model.named_parameters())
        # Everything the servers hold, by name: parameters (frozen ones too) and persistent buffers.
        self.tensors = model_tensors(self.model)
        self.kinds = tensor_kinds(self.model)
        self.buffers = [n for n, k in self.kinds.items() if k is TensorKind.BUFFER]
        self._loss = resolve_loss(spec.loss)
        # Row-sparse parameters (embedding tables) are pulled by the rows each batch touches,
        # which the model names (``rows_touched``); their gradients stay sparse COO tensors.
        self.sparse = sparse_parameter_names(self.model)
        if self.sparse and not callable(getattr(self.model, "rows_touched", None)):
            raise ConfigError(
                f"model {spec.model} has sparse parameters {sorted(self.sparse)} but no "
                "rows_touched(x) method naming the rows a batch reads"
            )

    def rows_touched(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """For each sparse parameter, the sorted rows the batch of these samples reads."""
        if not self.sparse:
            return {}
        x, _ = take(self.workload.train, indices)
        return self.model.rows_touched(x)  # type: ignore[operator]

    def batches(self, shard: ShardRange) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset after the batch, sample indices) from the shard's offset on. The order within a
        shard is a permutation fixed by (seed, epoch, shard), so a resumed shard continues exactly
        where the previous holder stopped."""
        size = shard.end - shard.start
        generator = torch.Generator().manual_seed(
            (self.spec.seed * 1_000_003 + shard.epoch * 10_007 + shard.shard) % (2**63)
        )
        order = shard.start + torch.randperm(size, generator=generator)
        bs = self.spec.batch_size
        for lo in range(shard.offset, size, bs):
            hi = min(size, lo + bs)
            yield hi, order[lo:hi]

    def gradients(self, indices: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        """Mean loss (the job's) of the batch and what a push carries: the gradient of each
        trainable parameter that has one (torch's ``grad is None`` leaves it out: the servers'
        optimizer skips it, as torch.optim does), and for each buffer the forward pass changed
        (BatchNorm's running statistics), its change."""
        x, y = take(self.workload.train, indices)
        before = {name: self.tensors[name].detach().clone() for name in self.buffers}
        self.model.zero_grad(set_to_none=True)
        output = self.model(x)
        loss = self._loss(output, shape_target(self.spec.loss, self.task, output, y))
        loss.backward()
        grads = {}
        for name, p in self.params.items():
            if not p.requires_grad:
                continue
            if p.grad is not None:
                grads[name] = p.grad.detach()
            elif name in self.sparse:  # the table is unused in this batch: no rows touched
                grads[name] = empty_row_sparse(p)
        for name, old in before.items():
            if old.dtype == torch.bool:
                continue  # a flag, not a statistic: it has no change to average
            change = self.tensors[name].detach() - old
            if bool(change.any()):
                grads[name] = change
        return float(loss.detach()), grads

    def evaluate(self) -> Evaluation:
        return evaluate(
            self.model, self.workload.test, self.workload.num_classes,
            task=self.task, loss=self.spec.loss, loss_fn=self._loss,
        )


def divergence(result: Evaluation) -> str | None:
    """Why an evaluation shows that the model diverged (its loss, or a regression metric, is NaN
    or infinite), or None. Such values are no result: the coordinator refuses them."""
    for name in ("loss", "mse", "mae", "r2"):
        value = getattr(result, name)
        if value is not None and not math.isfinite(value):
            return f"the model diverged: evaluation {name} is {value}"
    return None
