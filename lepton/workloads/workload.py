"""The Workload type (a dataset pair and the facts a model factory needs) and batching."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset

from lepton.tasks import CLASSIFICATION


@dataclass(frozen=True)
class Workload:
    """A dataset pair and the facts a model factory needs. ``input_dim`` is the number of values in
    one sample (features, or token ids per document); ``num_classes`` the number of class ids of
    integer labels (0 for real-valued targets); ``vocab_size`` is set for token-id data: the ids
    lie in ``[0, vocab_size)``; ``target_dim`` is the number of values in one label (1 for a
    scalar label)."""

    train: Dataset
    test: Dataset
    input_dim: int
    num_classes: int
    vocab_size: int | None = None
    target_dim: int = 1

    @property
    def label_dtype(self) -> torch.dtype:
        return take(self.train, torch.arange(1))[1].dtype

    def output_dim(self, task: str, loss: str) -> int:
        """The model's output width: one logit per class for a classification loss on class ids,
        else one value per target value (``bce_with_logits``: one logit per label)."""
        if task == CLASSIFICATION and loss != "bce_with_logits" and self.num_classes > 0:
            return self.num_classes
        return self.target_dim


def take(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, labels) batch of the given sample indices; labels keep their dtype (plain
    Python ints become int64, floats float32)."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors
        return x[indices], y[indices]
    take_rows = getattr(dataset, "take_rows", None)  # file-backed rows read a batch at once
    if take_rows is not None:
        return take_rows(indices)
    items = [dataset[int(i)] for i in indices]
    labels = [torch.as_tensor(y) for _, y in items]
    if labels and labels[0].is_floating_point():
        labels = [y.to(torch.float32) if y.dtype == torch.float64 else y for y in labels]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.stack(labels)
