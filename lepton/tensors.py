"""What a tensor is, independent of the wire: name, dtype, shape and size in bytes."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a parameter (what a receiver expects)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    """Bytes a tensor of this dtype and shape occupies (and so its size on the wire)."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
