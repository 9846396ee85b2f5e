"""The parameter layout: which parameter server holds which rows of which tensor, balanced by
bytes.

The rule (ps-lite's key ranges, at row granularity): the model's parameters, in the model's order,
are laid end to end as one stream of rows (a row is one index along dimension 0; a 0-dim tensor is
one row). The stream is cut into as many contiguous ranges of equal bytes as there are servers,
each cut moved to the nearest row boundary: a row goes to the server whose range holds the row's
middle byte. So every server holds within one row's bytes of an equal share, at most
``servers - 1`` parameters are sliced, each into contiguous row ranges, and a parameter that fits
inside one range stays whole. Deterministic for the same parameters and servers.

Slicing along dimension 0 leaves the mathematics unchanged for every element-wise optimizer
(``lepton.optimizers.ELEMENT_WISE``: SGD, Adam, AdamW, Adagrad, RMSprop, ...): each element's
update depends only on its own gradient and state. For the others (Adafactor, Muon) the layout
keeps every tensor whole (``whole_tensors``): each goes, largest first, to the server holding the
fewest bytes so far (ties: the earlier server), so no tensor is ever sliced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lepton.errors import InvalidArgument
from lepton.tensors import TensorSpec, nbytes, row_slice


@dataclass(frozen=True)
class Layout:
    """A versioned assignment of tensors (whole parameters or row slices) to servers (server ids in
    registration order)."""

    version: int
    servers: tuple[str, ...]
    assignment: dict[str, tuple[TensorSpec, ...]]

    def tensors_of(self, server_id: str) -> tuple[TensorSpec, ...]:
        return self.assignment.get(server_id, ())

    def bytes_of(self, server_id: str) -> int:
        return sum(nbytes(t.dtype, t.shape) for t in self.tensors_of(server_id))

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return tuple(t for s in self.servers for t in self.tensors_of(s))


def _rows(spec: TensorSpec) -> int:
    return spec.shape[0] if spec.shape else 1


def balance(
    tensors: Sequence[TensorSpec], servers: Sequence[str], version: int, whole_tensors: bool = False
) -> Layout:
    """Cuts the row stream of ``tensors`` (whole parameters, in model order) into equal-byte
    contiguous ranges, one per server, or with ``whole_tensors`` places each tensor whole (see the
    module docstring). Raises InvalidArgument without servers, and with ``whole_tensors`` when
    there are more servers than tensors (a server would hold nothing)."""
    if not servers:
        raise InvalidArgument("a layout needs at least one parameter server")
    if whole_tensors:
        return _whole(tensors, servers, version)
    m = len(servers)
    total = sum(nbytes(t.dtype, t.shape) for t in tensors)
    placed: dict[str, list[TensorSpec]] = {s: [] for s in servers}
    before = 0  # bytes of the stream before the current parameter
    for spec in tensors:
        rows = _rows(spec)
        size = nbytes(spec.dtype, spec.shape)
        if rows == 0 or size == 0:
            placed[servers[min(m - 1, before * m // max(total, 1))]].append(spec)
            continue
        row = size // rows
        # Row r goes to server k = floor((before + r*row + row/2) * m / total), in integers:
        # k = floor((2*before + (2r + 1)*row) * m / (2*total)).
        def server_of(r: int) -> int:
            # called only within this iteration, so the loop variables are current
            return min(m - 1, (2 * before + (2 * r + 1) * row) * m // (2 * total))  # noqa: B023

        start = 0
        while start < rows:
            k = server_of(start)
            # the first row that belongs to a later server (server_of is non-decreasing in r)
            lo, hi = start + 1, rows
            while lo < hi:
                mid = (lo + hi) // 2
                if server_of(mid) > k:
                    hi = mid
                else:
                    lo = mid + 1
            end = lo
            placed[servers[k]].append(row_slice(spec, start, end))
            start = end
        before += size
    return Layout(version, tuple(servers), {s: tuple(placed[s]) for s in servers})


def _whole(tensors: Sequence[TensorSpec], servers: Sequence[str], version: int) -> Layout:
    if len(servers) > len(tensors):
        raise InvalidArgument(
            f"{len(servers)} parameter servers for {len(tensors)} tensors kept whole: a server would hold nothing"
        )
    placed: dict[str, list[TensorSpec]] = {s: [] for s in servers}
    load = {s: 0 for s in servers}
    order = sorted(range(len(tensors)), key=lambda i: -nbytes(tensors[i].dtype, tensors[i].shape))
    for i in order:  # sorted() is stable: equal sizes keep model order
        target = min(servers, key=lambda s: load[s])  # min() keeps the first of equals
        placed[target].append(tensors[i])
        load[target] += nbytes(tensors[i].dtype, tensors[i].shape)
    position = {t.name: i for i, t in enumerate(tensors)}
    return Layout(
        version, tuple(servers), {s: tuple(sorted(placed[s], key=lambda t: position[t.name])) for s in servers}
    )
