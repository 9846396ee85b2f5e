"""The trainer: the job's model and data, and nothing about the network. The data path
(worker/dataplane.py) writes pulled values into its tensors; the agent asks it for gradients."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

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
class LoaderOptions:
    """How a worker's DataLoader makes batches: ``workers`` processes (0: in the training thread),
    each with ``prefetch`` batches in flight, into pinned memory with ``pin_memory``."""

    workers: int = 0
    pin_memory: bool = False
    prefetch: int = 2


@dataclass(frozen=True)
class Batch:
    """One batch of a shard: the shard offset after it, its sample indices and their data."""

    offset_after: int
    indices: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor


class _Samples(Dataset):
    """What the DataLoader indexes: a whole batch of sample indices at a time."""

    def __init__(self, source: Dataset) -> None:
        self.source = source

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return take(self.source, indices)


@dataclass(frozen=True)
class ShardRange:
    epoch: int
    shard: int
    start: int
    end: int
    offset: int


class Trainer:
    """Owns the model replica and the dataset; computes mean-loss gradients of batches."""

    def __init__(self, spec: JobSpec, loader: LoaderOptions = LoaderOptions()) -> None:
        self.spec = spec
        self.loader = loader
        self.workload = load_workload(spec.dataset, spec.seed, spec.feature_columns, spec.label_column)
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

    def rows_touched(self, batch: Batch | torch.Tensor) -> dict[str, torch.Tensor]:
        """For each sparse parameter, the sorted rows the batch reads."""
        if not self.sparse:
            return {}
        x, _ = self._data(batch)
        return self.model.rows_touched(x)  # type: ignore[operator]

    def _data(self, batch: Batch | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's (inputs, labels); sample indices are read from the training set."""
        if isinstance(batch, Batch):
            return batch.x, batch.y
        return take(self.workload.train, batch)

    def order(self, shard: ShardRange) -> torch.Tensor:
        """The shard's sample indices in training order: a permutation fixed by (seed, epoch,
        shard), so a resumed shard continues exactly where the previous holder stopped."""
        generator = torch.Generator().manual_seed(
            (self.spec.seed * 1_000_003 + shard.epoch * 10_007 + shard.shard) % (2**63)
        )
        return shard.start + torch.randperm(shard.end - shard.start, generator=generator)

    def batches(self, shard: ShardRange) -> Iterator[Batch]:
        """The shard's batches from its offset on, in ``order``, made by a DataLoader over the
        rows of this shard only (a file-backed set reads just those: ``window``)."""
        order, bs, size = self.order(shard), self.spec.batch_size, shard.end - shard.start
        spans = [(lo, min(size, lo + bs)) for lo in range(shard.offset, size, bs)]
        if not spans:
            return
        window = getattr(self.workload.train, "window", None)
        source = window(shard.start, shard.end) if window is not None else self.workload.train
        workers = self.loader.workers
        loader = DataLoader(
            _Samples(source),
            batch_size=None,  # the sampler yields whole batches of indices
            sampler=[order[lo:hi] for lo, hi in spans],
            num_workers=workers,
            pin_memory=self.loader.pin_memory,
            prefetch_factor=self.loader.prefetch if workers else None,
        )
        for (lo, hi), (x, y) in zip(spans, loader):
            yield Batch(hi, order[lo:hi], x, y)

    def gradients(self, batch: Batch | torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        """Mean loss (the job's) of the batch (or of these sample indices) and what a push
        carries: the gradient of each trainable parameter that has one (torch's ``grad is None``
        leaves it out: the servers' optimizer skips it, as torch.optim does), and for each buffer
        the forward pass changed (BatchNorm's running statistics), its change."""
        x, y = self._data(batch)
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
