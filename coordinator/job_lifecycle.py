"""A coordinator job's lifecycle: its state and how it moves (training, the epochs, evaluating,
the final checkpoint), and the checkpoints the parameter servers are asked for and report."""

from __future__ import annotations

from coordinator.checkpoints import Checkpoint
from coordinator.events import EventKind
from coordinator.job_base import JobCore
from coordinator.job_types import JobState
from coordinator.validation import validation_due
from lepton.domain import CheckpointReport


class LifecycleOps(JobCore):
    """Lifecycle of a Job (under its lock); the operations build on it (job_membership.py, job.py)."""

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def ps_recovery_timeout_s(self) -> float:
        return self._fleet.recovery_timeout_s

    @property
    def ps_restarts(self) -> int:
        return self._fleet.restarts

    @property
    def steps_rolled_back(self) -> int:
        return self._fleet.steps_rolled_back

    @property
    def state(self) -> JobState:
        with self._lock:
            return self._state

    def _set_state(self, state: JobState, now: float, why: str = "") -> None:
        if state is self._state or self._state.terminal:  # a finished job stays finished
            return
        self._state = state
        if state is JobState.TRAINING and self._train_started is None:
            self._train_started = now
        if state in (JobState.EVALUATING, JobState.FAILED) and self._train_ended is None:
            self._train_ended = now
        self.events.append(
            EventKind.JOB_STATE_CHANGED,
            f"job {state.name.lower()}" + (f": {why}" if why else ""),
            job_state=state.name,
        )
        if state is JobState.TRAINING:
            self._announce_epoch()
        if state is JobState.EVALUATING and self._layout is not None:
            # Training is over: the servers snapshot their final parameters (what `lepton export`
            # turns into a state_dict), coalesced with a checkpoint already pending.
            self._request_checkpoint(now, "final", final=True)

    def _epoch_ended(self, ended: int, now: float) -> None:
        """After the ledger moved past epoch ``ended``: the final evaluation, or the next epoch
        (after a validation, if one is due: no lease is granted until it is in)."""
        if self._ledger.finished:
            self._set_state(JobState.EVALUATING, now)
            return
        if validation_due(self.spec, ended):
            self._validation_due = ended
            self._evaluator = None
        self._announce_epoch()

    def _announce_epoch(self) -> None:
        if not self._ledger.finished and self._ledger.epoch != self._last_epoch_announced:
            self._last_epoch_announced = self._ledger.epoch
            self.events.append(
                EventKind.EPOCH_STARTED, f"epoch {self._ledger.epoch} started", epoch=self._ledger.epoch
            )

    # --- checkpoints ---------------------------------------------------------------------------

    def _training_moves(self) -> bool:
        """Whether workers may still move the servers' versions (a sync target lies ahead)."""
        return self._state is JobState.TRAINING and self._ledger.leased > 0

    def _request_checkpoint(self, now: float, reason: str, final: bool = False) -> tuple[Checkpoint, bool]:
        assert self._layout is not None
        return self._checkpoints.request(
            self._layout, self._fleet.versions, self._training_moves(), self._state.name, now, reason, final
        )

    def _record_checkpoint(
        self, member_id: str, incarnation: int, report: CheckpointReport, now: float
    ) -> None:  # under _changing
        if self._checkpoints.record(member_id, report, self._layout, now, incarnation):
            self._persist(now)
