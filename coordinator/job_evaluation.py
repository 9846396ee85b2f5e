"""Evaluating a coordinator job: the final evaluation and the validations due during training,
the worker asked for each, its result (recorded, or the job succeeds or stops early) or its
declining them."""

from __future__ import annotations

from coordinator.events import EventKind
from coordinator.job_membership import MembershipOps
from coordinator.job_types import (
    MAX_FAILURE_REASON_CHARS,
    EvaluationResult,
    JobState,
    describe_evaluation,
    evaluation_problem,
)
from coordinator.validation import ValidationRecord, early_stop_reason
from lepton.errors import FailedPrecondition, InvalidArgument


class EvaluationOps(MembershipOps):
    """Evaluation operations of a Job (under its lock, each change committed before it answers)."""

    def report_evaluation(
        self, member_id: str, incarnation: int, result: EvaluationResult, now: float, model_version: int = 0
    ) -> None:
        """The evaluation the worker was asked for: a due validation's (recorded, training goes on)
        or the final one (the job succeeds). ``model_version``: the newest server version among
        the parameters it evaluated (0: unknown, the newest heard from the servers is recorded).
        Raises FailedPrecondition (not asked) and InvalidArgument (impossible metrics)."""
        with self._changing():
            self._worker(member_id, incarnation)
            if not self._evaluating(member_id, incarnation):
                raise FailedPrecondition(f"{member_id} was not asked to evaluate")
            problem = evaluation_problem(result)
            if problem:
                raise InvalidArgument(problem)
            if model_version < 0:
                raise InvalidArgument(f"model_version must be >= 0 (0: unknown), got {model_version}")
            if self._state is JobState.TRAINING:
                self._record_validation(member_id, incarnation, result, now, model_version)
                self._persist(now)
                return
            ended = self._ledger.epoch - 1  # the last epoch trained (earlier, if it stopped early)
            if self.spec.eval_every_epochs and (not self._validation or self._validation[-1].epoch != ended):
                self._validation.append(self._validation_row(ended, result, model_version, final=True))
            self._evaluation = result
            self.events.append(
                EventKind.EVALUATED,
                f"test {describe_evaluation(result)} on {result.samples} samples",
                member_id=member_id,
                incarnation=incarnation,
                loss=result.loss,
            )
            self._set_state(JobState.SUCCEEDED, now)
            self._persist(now)

    def decline_evaluation(self, member_id: str, incarnation: int, reason: str, now: float) -> None:
        """The evaluating worker gives the evaluation back: the next worker to ask for a lease
        gets it, never this incarnation again. Raises FailedPrecondition if it does not hold the
        evaluation, InvalidArgument for an over-long reason."""
        reason = reason.strip()
        if len(reason) > MAX_FAILURE_REASON_CHARS:
            raise InvalidArgument(f"a reason has at most {MAX_FAILURE_REASON_CHARS} characters")
        with self._changing():
            self._worker(member_id, incarnation)
            if not self._evaluating(member_id, incarnation):
                raise FailedPrecondition(f"{member_id} does not hold the evaluation")
            self._evaluator = None
            self._declined.add((member_id, incarnation))
            self.events.append(
                EventKind.EVALUATION_DECLINED,
                f"{member_id} declined the evaluation" + (f": {reason}" if reason else ""),
                member_id=member_id,
                incarnation=incarnation,
            )
            self._persist(now)

    def _evaluating(self, member_id: str, incarnation: int) -> bool:
        """Whether this worker is the one asked for the final evaluation or a due validation."""
        due = self._state is JobState.EVALUATING or (
            self._state is JobState.TRAINING and self._validation_due is not None
        )
        return due and self._evaluator == (member_id, incarnation)

    def _validation_row(
        self, epoch: int, result: EvaluationResult, model_version: int, final: bool = False
    ) -> ValidationRecord:
        return ValidationRecord(
            epoch=epoch,
            step=model_version or max(self._fleet.versions.values(), default=0),
            samples_trained=self._progress.samples,
            training_seconds=self._training_seconds(self._last_now),
            time_unix_s=self._wall_clock(),
            evaluation=result,
            final=final,
        )

    def _record_validation(
        self, member_id: str, incarnation: int, result: EvaluationResult, now: float, model_version: int
    ) -> None:
        """A due validation's result: recorded, training resumes (or stops early)."""
        assert self._validation_due is not None
        self._last_now = max(self._last_now, now)
        row = self._validation_row(self._validation_due, result, model_version)
        self._validation.append(row)
        self._validation_due = None
        self._evaluator = None
        self.events.append(
            EventKind.VALIDATED,
            f"validation after epoch {row.epoch}: {describe_evaluation(result)} on {result.samples} samples",
            member_id=member_id,
            incarnation=incarnation,
            epoch=row.epoch,
            loss=result.loss,
            extra={"validation": row.to_state()},
        )
        try:
            why = early_stop_reason(self.spec, self._validation)
        except ValueError as exc:
            self._failure = str(exc)
            self._set_state(JobState.FAILED, now, self._failure)
            return
        if why is not None:
            self._stopped_early = why
            self._set_state(JobState.EVALUATING, now, why)
