"""``async``: a pushed gradient is applied on arrival.

Staleness (version at apply minus base version) is recorded, and the push's learning rate is
scaled by the gate's ``lr_scaling`` policy (``ps_server/staleness.py``) from its staleness and the
number of workers pushing (members that pushed here and are still live).
"""

from __future__ import annotations

from collections.abc import Callable

from ps_server.gate import ConsistencyGate, Grads, Key, PushOutcome, PushResult
from ps_server.staleness import STALENESS_AWARE, LrScaling
from ps_server.store import ParameterStore


class AsyncGate(ConsistencyGate):
    mode = "async"

    def __init__(
        self,
        store: ParameterStore,
        step_timeout_s: float,
        after_apply: Callable[[ParameterStore], None] | None = None,
        lr_scaling: LrScaling = STALENESS_AWARE,
    ) -> None:
        super().__init__(store, step_timeout_s, after_apply)
        self._lr_scaling = lr_scaling
        self._pushers: set[str] = set()  # members that pushed and are not known to be dead

    def _offer(
        self, key: Key, member_id: str, base_version: int, grads: Grads, samples: int, now: float
    ) -> PushResult:
        staleness = self.store.version - base_version
        self._pushers.add(member_id)
        lr_scale = self._lr_scaling.lr_scale(staleness, len(self._pushers))
        if lr_scale != 1.0:
            self.counters.pushes_lr_scaled += 1
        self._apply(grads, lr_scale)
        self.counters.observe_staleness(staleness)
        self._cond.notify_all()
        result = PushResult(PushOutcome.APPLIED, self.store.version, staleness)
        self._remember(key, result)
        return result

    def _retain_live(self, live: set[str]) -> None:
        self._pushers &= live
