"""The consistency modes a job may name, and the gate each one opens."""

from __future__ import annotations

from collections.abc import Callable

from ps_server.gate import ConsistencyGate
from ps_server.gate_async import AsyncGate
from ps_server.gate_ssp import SspGate
from ps_server.gate_sync import SyncGate
from ps_server.staleness import STALENESS_AWARE, LrScaling
from ps_server.store import ParameterStore

MODES = ("async", "sync", "ssp")


def consistency_gate(
    store: ParameterStore,
    mode: str,
    step_timeout_s: float,
    after_apply: Callable[[ParameterStore], None] | None = None,
    staleness: int = 0,
    lr_scaling: LrScaling = STALENESS_AWARE,
) -> ConsistencyGate:
    """The gate of ``mode`` over ``store``; ``staleness`` binds ssp, ``lr_scaling`` async.
    Raises ValueError for an unknown mode or a negative staleness."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if mode == "async":
        return AsyncGate(store, step_timeout_s, after_apply, lr_scaling)
    if mode == "ssp":
        return SspGate(store, step_timeout_s, after_apply, staleness)
    return SyncGate(store, step_timeout_s, after_apply)
