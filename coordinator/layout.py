"""The parameter layout: which parameter server holds which tensor, balanced by bytes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lepton.tensors import TensorSpec, nbytes
from lepton.errors import InvalidArgument


@dataclass(frozen=True)
class Layout:
    """A versioned assignment of tensors to servers (server ids in registration order)."""

    version: int
    servers: tuple[str, ...]
    assignment: dict[str, tuple[TensorSpec, ...]]

    def tensors_of(self, server_id: str) -> tuple[TensorSpec, ...]:
        return self.assignment.get(server_id, ())

    def bytes_of(self, server_id: str) -> int:
        return sum(nbytes(t.dtype, t.shape) for t in self.tensors_of(server_id))


def balance(tensors: Sequence[TensorSpec], servers: Sequence[str], version: int) -> Layout:
    """Greedy largest-first onto the least-loaded server (ties: fewest tensors, then order).
    Deterministic for the same inputs."""
    if not servers:
        raise InvalidArgument("a layout needs at least one parameter server")
    load = {s: 0 for s in servers}
    placed: dict[str, list[TensorSpec]] = {s: [] for s in servers}
    order = sorted(tensors, key=lambda t: (-nbytes(t.dtype, t.shape), t.name))
    for spec in order:
        target = min(servers, key=lambda s: (load[s], len(placed[s]), servers.index(s)))
        placed[target].append(spec)
        load[target] += nbytes(spec.dtype, spec.shape)
    return Layout(version, tuple(servers), {s: tuple(placed[s]) for s in servers})
