"""A user's own data set and model, referenced as ``package.module:factory`` strings."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def blobs(seed: int = 0):
    """Two well-separated Gaussian blobs in 5 dimensions: (train, test)."""
    g = torch.Generator().manual_seed(1234)
    centers = torch.tensor([[2.0] * 5, [-2.0] * 5])
    y = torch.randint(0, 2, (600,), generator=g)
    x = centers[y] + torch.randn(600, 5, generator=g)
    return TensorDataset(x[:500], y[:500]), TensorDataset(x[500:], y[500:])


def linear(input_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(input_dim, num_classes)


TOKENS_VOCAB = 300


def token_bags(seed: int = 0):
    """Documents of 8 token ids: class c draws most tokens from its own third of the vocabulary,
    some from anywhere: (train, test)."""
    g = torch.Generator().manual_seed(4321)
    y = torch.randint(0, 3, (900,), generator=g)
    own = y[:, None] * (TOKENS_VOCAB // 3) + torch.randint(0, TOKENS_VOCAB // 3, (900, 8), generator=g)
    noise = torch.randint(0, TOKENS_VOCAB, (900, 8), generator=g)
    x = torch.where(torch.rand(900, 8, generator=g) < 0.7, own, noise)
    return TensorDataset(x[:750], y[:750]), TensorDataset(x[750:], y[750:])


def bag_of_embeddings(num_classes: int):
    """A sparse embedding table (row-sparse gradients, pulled by rows) and a linear classifier."""
    from lepton.workloads import EmbeddingBagClassifier

    return EmbeddingBagClassifier(TOKENS_VOCAB, num_classes, dim=8)


class FrozenFirstLayer(nn.Module):
    """A feature extractor the user froze (``requires_grad=False``) and a trainable head."""

    def __init__(self, input_dim: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Linear(input_dim, 16)
        self.head = nn.Linear(16, num_classes)
        self.features.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)))


class UnusedBranch(nn.Module):
    """A module with a branch its forward never calls: its parameters never get a gradient."""

    def __init__(self, input_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(input_dim, 16)
        self.head = nn.Linear(16, num_classes)
        self.auxiliary = nn.Linear(16, num_classes)  # e.g. a head used only in another phase

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def frozen_first_layer(input_dim: int, num_classes: int) -> nn.Module:
    return FrozenFirstLayer(input_dim, num_classes)


def unused_branch(input_dim: int, num_classes: int) -> nn.Module:
    return UnusedBranch(input_dim, num_classes)


def batchnorm_mlp(input_dim: int, num_classes: int) -> nn.Module:
    """An MLP with BatchNorm: running statistics (buffers) that evaluation depends on."""
    return nn.Sequential(nn.Linear(input_dim, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes))
def noisy_line(seed: int = 0):
    """A regression set as plain lists of (features, float target) pairs, no TensorDataset:
    y = x . w + N(0, 0.1²) in 5 dimensions, 400 train and 100 test samples."""
    g = torch.Generator().manual_seed(99)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    x = torch.randn(500, 5, generator=g)
    y = x @ w + 0.1 * torch.randn(500, generator=g)
    pairs = [(x[i], float(y[i])) for i in range(500)]
    return pairs[:400], pairs[400:]


def regressor(input_dim: int, output_dim: int) -> nn.Module:
    return nn.Linear(input_dim, output_dim)


def huber() -> nn.Module:
    """A loss factory: any callable (output, target) -> scalar mean loss."""
    return nn.HuberLoss(delta=1.0)


class NanWhenEvaluated(nn.Module):
    """A linear model that trains normally and answers NaN in eval mode: a model whose weights
    diverged, as evaluation sees it."""

    def __init__(self, input_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if self.training else out * float("nan")


def nan_when_evaluated(input_dim: int, num_classes: int) -> nn.Module:
    return NanWhenEvaluated(input_dim, num_classes)
