"""What a tensor is, independent of the wire: name, dtype, shape and size in bytes; and how a
parameter is cut into row slices (along dimension 0) and put back together."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

import torch

from lepton.errors import InvalidArgument


class TensorKind(Enum):
    """What a tensor of the layout is in the model, and so how a parameter server treats it."""

    PARAMETER = "parameter"  # trainable: the optimizer updates it when a push carries its gradient
    FROZEN = "frozen"  # requires_grad=False: never updated, never pushed
    BUFFER = "buffer"  # a persistent buffer: pushes carry its change since the pull


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor a parameter server holds (what a receiver expects).

    A whole parameter has ``parameter == ""`` and ``name`` is the parameter's name. A slice holds
    rows ``[row_offset, row_offset + shape[0])`` of ``parameter`` (whose full shape is
    ``parameter_shape``) and has a name of its own, unique in the layout (see ``slice_name``).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    parameter: str = ""
    row_offset: int = 0
    parameter_shape: tuple[int, ...] = ()
    sparse: bool = False  # row-sparse gradients (an embedding table): pulled and pushed by rows
    kind: TensorKind = TensorKind.PARAMETER

    @property
    def trainable(self) -> bool:
        return self.kind is TensorKind.PARAMETER

    @property
    def pushed(self) -> bool:
        """Whether a push may carry this tensor (a gradient, or a buffer's change)."""
        return self.kind is not TensorKind.FROZEN

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    @property
    def is_slice(self) -> bool:
        return bool(self.parameter)

    @property
    def of(self) -> str:
        """The model parameter this tensor is (part of)."""
        return self.parameter or self.name

    @property
    def rows(self) -> tuple[int, int]:
        """[start, end) along dimension 0 of the parameter (a whole 0-dim tensor: (0, 1))."""
        count = self.shape[0] if self.shape else 1
        return self.row_offset, self.row_offset + count


def nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    """Bytes a tensor of this dtype and shape occupies (and so its size on the wire)."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def slice_name(parameter: str, start: int, end: int) -> str:
    """The name of rows [start, end) of ``parameter`` on the wire and in checkpoints."""
    return f"{parameter}[{start}:{end}]"


def row_slice(parameter: TensorSpec, start: int, end: int) -> TensorSpec:
    """Rows [start, end) of a whole parameter as a spec of their own (the whole parameter when the
    range covers it)."""
    if parameter.is_slice:
        raise ValueError(f"{parameter.name} is already a slice")
    count = parameter.shape[0] if parameter.shape else 1
    if not 0 <= start < end <= count:
        raise ValueError(f"rows [{start}, {end}) are not inside {parameter.name} ({count} rows)")
    if (start, end) == (0, count):
        return parameter
    return TensorSpec(
        slice_name(parameter.name, start, end),
        parameter.dtype,
        (end - start, *parameter.shape[1:]),
        parameter=parameter.name,
        row_offset=start,
        parameter_shape=parameter.shape,
        sparse=parameter.sparse,
        kind=parameter.kind,
    )


def part(tensors: Mapping[str, torch.Tensor], spec: TensorSpec) -> torch.Tensor:
    """The piece of a whole parameter (``tensors`` keyed by parameter name) that ``spec`` names:
    a view of its rows, no copy."""
    full = tensors[spec.of]
    if not spec.is_slice:
        return full
    return full.narrow(0, spec.row_offset, spec.shape[0])


def assemble(specs: Iterable[TensorSpec], values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole parameters from the tensors of a layout (``values`` keyed by the specs' names).
    Raises InvalidArgument when a parameter's slices do not cover its rows exactly once."""
    whole: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        if spec.is_slice:
            pieces.setdefault(spec.parameter, []).append(spec)
        else:
            whole[spec.name] = values[spec.name]
    for parameter, slices in pieces.items():
        slices.sort(key=lambda s: s.row_offset)
        expected = 0
        for s in slices:
            if s.row_offset != expected:
                raise InvalidArgument(f"the slices of {parameter} do not cover row {expected} exactly once")
            expected = s.rows[1]
        rows = slices[0].parameter_shape[0] if slices[0].parameter_shape else expected
        if expected != rows:
            raise InvalidArgument(f"the slices of {parameter} end at row {expected} of {rows}")
        whole[parameter] = torch.cat([values[s.name] for s in slices])
    return whole


def rows_in(spec: TensorSpec, rows: torch.Tensor) -> torch.Tensor:
    """Those of ``rows`` (indices of the whole parameter) that ``spec`` holds, counted from the
    spec's first row."""
    start, end = spec.rows
    return rows[(rows >= start) & (rows < end)] - start


def sparse_part(grad: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The piece of a row-sparse (COO, sparse along dimension 0) gradient of a whole parameter
    that ``spec`` holds, re-indexed from the spec's first row, coalesced (possibly empty)."""
    grad = grad.coalesce()
    if not spec.is_slice:
        return grad
    rows, values = grad.indices()[0], grad.values()
    start, end = spec.rows
    keep = (rows >= start) & (rows < end)
    return torch.sparse_coo_tensor(
        (rows[keep] - start).reshape(1, -1), values[keep], spec.shape, is_coalesced=True, check_invariants=False
    )


def empty_row_sparse(like: torch.Tensor) -> torch.Tensor:
    """A coalesced row-sparse (COO) gradient of ``like``'s shape and dtype that touches no row:
    what a batch that reads none of an embedding table's rows produces."""
    return torch.sparse_coo_tensor(
        torch.empty(1, 0, dtype=torch.int64), torch.empty(0, *like.shape[1:], dtype=like.dtype), like.shape,
        is_coalesced=True, check_invariants=False,
    )


def payload_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies on the wire: a row-sparse one counts its rows and row indices."""
    if t.is_sparse:
        values = t._values()
        return values.numel() * values.element_size() + t._indices().numel() * 8
    return t.numel() * t.element_size()


def check_rows(name: str, rows: torch.Tensor, count: int, distinct: bool = False) -> None:
    """Raises InvalidArgument unless ``rows`` are distinct indices in [0, count) (``distinct``:
    the caller knows they are, e.g. strictly increasing; only the range is checked)."""
    if rows.numel() == 0:
        return
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= count:
        raise InvalidArgument(f"tensor {name!r}: row {low if low < 0 else high} outside [0, {count})")
    if not distinct and torch.unique(rows).numel() != rows.numel():
        raise InvalidArgument(f"tensor {name!r}: a row is selected more than once")
