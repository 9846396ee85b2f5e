"""``sync``: step ``v`` turns version ``v`` into ``v + 1`` with the sample-weighted mean of the
gradients computed from version ``v``.

The step closes as soon as every participant has pushed. Participants are the workers that pushed
recently: a worker joins by pushing or by ``join`` (from a given step on), leaves by ``leave`` (no
shard to train) or by being declared dead (``retain_live``). A step also closes when
``step_timeout_s`` has passed since its first push, without the missing workers, who stop being
participants: nothing ever waits longer than the timeout for a slow, dead or idle worker.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lepton.errors import DeadlineExceeded
from ps_server.gate import ClockWait, ConsistencyGate, Grads, Key, PushResult
from ps_server.store import ParameterStore


def _mean_as(mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A step's sample-weighted mean in the tensor's dtype: integers (a buffer's change, such as
    BatchNorm's num_batches_tracked) rounded to the nearest, not truncated."""
    if dtype.is_floating_point or dtype.is_complex:
        return mean.to(dtype)
    return mean.round().to(dtype)


class SyncGate(ConsistencyGate):
    mode = "sync"

    def __init__(
        self,
        store: ParameterStore,
        step_timeout_s: float,
        after_apply: Callable[[ParameterStore], None] | None = None,
    ) -> None:
        super().__init__(store, step_timeout_s, after_apply)
        self._participants: set[str] = set()
        self._joins: dict[str, int] = {}  # members taking part from that version on
        self._contributed: dict[str, int] = {}
        self._accum: dict[str, torch.Tensor] = {}
        self._accum_samples = 0
        self._step_opened_at: float | None = None

    def _participants_now(self) -> set[str]:
        return set(self._participants)

    def _is_stale(self, base_version: int, version: int) -> bool:
        return base_version != version  # only the open step takes gradients

    def _prepare(self, grads: Grads, samples: int) -> Grads:
        """The sample-weighted gradients in float64 (integer buffers' changes too): new tensors,
        made before the lock is taken."""
        return {name: g.to(torch.float64) * samples for name, g in grads.items()}

    def _offer(
        self, key: Key, member_id: str, base_version: int, grads: Grads, samples: int, now: float
    ) -> int:
        """Adds the weighted gradient (``_prepare``) to the open step; returns the version that
        closes it."""
        if member_id not in self._contributed:  # a retried push of the same step adds nothing
            for name, weighted in grads.items():
                if name in self._accum:
                    self._accum[name] += weighted
                else:
                    self._accum[name] = weighted  # a tensor of its own (``_prepare``)
            self._accum_samples += samples
            self._contributed[member_id] = samples
            if self._step_opened_at is None:
                self._step_opened_at = now
        self._participants.add(member_id)
        self._maybe_close()
        return base_version + 1

    def _await(self, pending: ClockWait | int, timeout_s: float, key: Key) -> PushResult:
        if not isinstance(pending, int):
            return super()._await(pending, timeout_s, key)
        return self.wait_for_version(pending, timeout_s, *key)

    def join(self, member_id: str, from_version: int, timeout_s: float) -> tuple[bool, int]:
        """``member_id`` takes part from step ``from_version`` on, if this server has not passed
        it; returns (joined, version) once the version reaches ``from_version`` (refused: at once,
        nothing changed). Raises DeadlineExceeded after ``timeout_s`` (the join stands until
        ``leave``).

        A server with no participant (every worker left, was dropped or is joining, as after
        this server restarted) has no step in flight, so nothing would move its version: it takes
        every waiting joiner into its open step at once (see ``_admit_idle``)."""
        with self._cond:
            version = self.store.version
            if member_id in self._participants:
                return True, version
            if version > from_version:
                return False, version
            if version == from_version:
                self._participants.add(member_id)  # the open step cannot close without it now
                return True, version
            self._joins[member_id] = from_version
            if self._admit_idle():
                return True, version
            if not self._cond.wait_for(
                lambda: self.store.version >= from_version or member_id not in self._joins, timeout=timeout_s
            ):
                raise DeadlineExceeded(
                    f"version {self.store.version} did not reach {from_version} within {timeout_s:.1f}s; "
                    "the join stands until LeaveSteps"
                )
            return member_id in self._participants, self.store.version

    def _admit_idle(self) -> bool:
        """With no participant left, takes every pending joiner into the open step (all of them at
        once, so they take part in the same steps here) and wakes them. Returns whether it did."""
        if self._participants or not self._joins:
            return False
        self._participants.update(self._joins)
        self._joins.clear()
        self._cond.notify_all()
        return True

    def _leave(self, member_id: str) -> None:
        self._participants.discard(member_id)
        self._joins.pop(member_id, None)
        self._maybe_close()
        self._admit_idle()

    def _retain_live(self, live: set[str]) -> None:
        self._participants &= live
        self._joins = {m: v for m, v in self._joins.items() if m in live}
        self._maybe_close()
        self._admit_idle()

    def _tick(self, now: float) -> bool:
        """Closes a step that has waited ``step_timeout_s`` for missing workers; returns whether it
        did. The missing workers stop being participants (they rejoin by pushing)."""
        opened = self._step_opened_at
        if opened is None or now - opened < self.step_timeout_s:
            return False
        self._participants = set(self._contributed)
        self.counters.steps_timed_out += 1
        self._close()
        return True

    def _maybe_close(self) -> None:
        if self._contributed and self._participants <= set(self._contributed):
            self._close()

    def _close(self) -> None:
        total = self._accum_samples
        specs = self.store.specs
        grads = {name: _mean_as(acc / total, specs[name].dtype) for name, acc in self._accum.items()}
        self._apply(grads)
        self._accum = {}
        self._accum_samples = 0
        self._contributed = {}
        self._step_opened_at = None
        for member, from_version in list(self._joins.items()):  # joiners whose step has come
            if from_version <= self.store.version:
                self._participants.add(member)
                del self._joins[member]
        self._cond.notify_all()
