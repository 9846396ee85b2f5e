"""The trainer: the job's model and data, and nothing about the network. The agent feeds it
parameters and asks for gradients of batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lepton.config import JobSpec
from lepton.workloads import Evaluation, build_model, evaluate, load_workload, take
from lepton.tensors import TensorSpec, part


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
        self.model = build_model(spec.model, self.workload, spec.seed)
        self.params: dict[str, nn.Parameter] = dict(self.model.named_parameters())
        self._loss = nn.CrossEntropyLoss()

    def set_parameters(
        self, tensors: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec] | None = None
    ) -> None:
        """Installs pulled tensors: whole parameters by name, or row slices (named in ``specs``)
        into their rows of the parameter."""
        with torch.no_grad():
            for name, value in tensors.items():
                spec = specs.get(name) if specs is not None else None
                target = part(self.params, spec) if spec is not None else self.params[name]
                target.copy_(value)

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
        """Mean cross-entropy of the batch and its gradient for every parameter."""
        x, y = take(self.workload.train, indices)
        self.model.zero_grad(set_to_none=True)
        loss = self._loss(self.model(x), y)
        loss.backward()
        grads = {
            name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
            for name, p in self.params.items()
        }
        return float(loss.detach()), grads

    def evaluate(self) -> Evaluation:
        return evaluate(self.model, self.workload.test, self.workload.num_classes)
