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
