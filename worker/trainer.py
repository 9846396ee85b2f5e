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
from worker.device import HostBuffers, LossScaler, autocast, check_precision, clip_by_global_norm, resolve_device


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


class _OnDevice(nn.Module):
    """A model on a device as evaluation sees it: inputs moved there, outputs back as float32 on
    the CPU, where the data set and the metrics live."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model, self.device = model, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.model(x.to(self.device))
        return output.float().cpu() if output.is_floating_point() else output.cpu()


class Trainer:
    """Owns the model replica and the dataset; computes mean-loss gradients of batches.

    Args:
        loader: how batches are made (``--loader-workers``, ``--pin-memory``, ``--prefetch``).
        device: where the model and batches live (``--device``; default: the job's ``device``).
        precision: autocast of forward and backward (``--precision``; default: the job's).

    Raises:
        ConfigError: a device this machine lacks, a precision it cannot run, or a model that
            cannot be served (see below).
    """

    def __init__(
        self,
        spec: JobSpec,
        loader: LoaderOptions = LoaderOptions(),
        device: str | None = None,
        precision: str | None = None,
    ) -> None:
        self.spec = spec
        self.loader = loader
        self.device = resolve_device(device or spec.device)
        self.precision = precision or spec.precision
        check_precision(self.precision, self.device)
        self.workload = load_workload(spec.dataset, spec.seed, spec.feature_columns, spec.label_column)
        self.task = resolve_task(spec.task, spec.loss, self.workload.label_dtype)
        self.model = build_model(
            spec.model, self.workload, spec.seed, self.workload.output_dim(self.task, spec.loss)
        ).to(self.device)
        # fp16 gradients underflow without loss scaling; a step whose scaled gradients overflow is skipped.
        self.scaler = LossScaler() if self.precision == "fp16" else None
        self._host = HostBuffers(self.device)
        self.last_grad_norm: float | None = None  # before clipping, when clipping is on
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
        return {n: r.cpu() for n, r in self.model.rows_touched(x.to(self.device)).items()}  # type: ignore[operator]

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
        """The shard's steps from its offset on, in ``order``: ``accumulate`` batches of
        ``batch_size`` per step (``gradients`` cuts them apart again), made by a DataLoader over the
        rows of this shard only (a file-backed set reads just those: ``window``)."""
        order, size = self.order(shard), shard.end - shard.start
        bs = self.spec.batch_size * self.spec.accumulate
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
        for (lo, hi), (x, y) in zip(spans, loader, strict=True):
            yield Batch(hi, order[lo:hi], x, y)

    def gradients(self, batch: Batch | torch.Tensor) -> tuple[float, dict[str, torch.Tensor] | None]:
        """Mean loss (the job's) of the batch (or of these sample indices) and what a push
        carries: the gradient of each trainable parameter that has one (torch's ``grad is None``
        leaves it out: the servers' optimizer skips it, as torch.optim does), and for each buffer
        the forward passes changed (BatchNorm's running statistics), its change; in host memory.

        The samples are cut into micro-batches of ``batch_size``, each its own forward and backward
        pass, their losses weighted by size (the gradient is that of the mean loss over all of
        them). Then, with ``clip_grad_norm``, the gradients are clipped by their global norm. With
        fp16, an overflowing step returns None for the gradients: it pushes nothing."""
        x_all, y_all = self._data(batch)
        before = {name: self.tensors[name].detach().clone() for name in self.buffers}
        self.model.zero_grad(set_to_none=True)
        total = len(x_all)
        loss_sum = 0.0
        scale = self.scaler.scale if self.scaler is not None else 1.0
        for x, y in zip(
            torch.split(x_all, self.spec.batch_size), torch.split(y_all, self.spec.batch_size), strict=True
        ):
            x, y = self._to_device(x), self._to_device(y)
            with autocast(self.precision, self.device):
                output = self.model(x)
                loss = self._loss(output, shape_target(self.spec.loss, self.task, output, y))
            weight = len(x) / total
            ((loss.float() * weight * scale) if weight != 1.0 or scale != 1.0 else loss).backward()
            loss_sum += float(loss.detach()) * len(x)
        mean_loss = loss_sum / max(total, 1)
        grads = {}
        for name, p in self.params.items():
            if not p.requires_grad:
                continue
            if p.grad is not None:
                grads[name] = p.grad.detach()
            elif name in self.sparse:  # the table is unused in this batch: no rows touched
                grads[name] = empty_row_sparse(p)
        if self.scaler is not None and not self.scaler.unscale(grads.values()):
            return mean_loss, None
        if self.spec.clip_grad_norm > 0:
            self.last_grad_norm = clip_by_global_norm(grads.values(), self.spec.clip_grad_norm)
        for name, old in before.items():
            if old.dtype == torch.bool:
                continue  # a flag, not a statistic: it has no change to average
            change = self.tensors[name].detach() - old
            if bool(change.any()):
                grads[name] = change
        return mean_loss, self._host.to_host(grads)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return t
        return t.to(self.device, non_blocking=t.is_pinned())

    def evaluate(self) -> Evaluation:
        model = self.model if self.device.type == "cpu" else _OnDevice(self.model, self.device)
        return evaluate(
            model, self.workload.test, self.workload.num_classes,
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
