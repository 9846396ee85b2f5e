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
