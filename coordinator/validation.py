"""Validation during training: the rows the coordinator records and the early-stopping rule.

A validation is due once an epoch whose number (1-based) is a multiple of
``JobSpec.eval_every_epochs`` ends before the last one; the job then grants no lease of the next
epoch until one worker has evaluated (coordinator/job.py), so the model it pulls is the one every
server holds at the epoch's end. Nothing here knows about gRPC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from lepton.config import EARLY_STOPPING_METRICS, JobSpec
from lepton.tasks import Evaluation


@dataclass(frozen=True)
class ValidationRecord:
    epoch: int  # the epoch that had just ended, 0-based
    step: int  # the newest parameter-server version heard when the result arrived
    samples_trained: int
    training_seconds: float
    time_unix_s: float
    evaluation: Evaluation
    final: bool = False  # the job's final evaluation

    def to_state(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> ValidationRecord:
        return cls(**{**state, "evaluation": Evaluation.from_state(state["evaluation"])})


def validation_due(spec: JobSpec, ended_epoch: int) -> bool:
    """Whether the end of ``ended_epoch`` (0-based, not the last epoch) calls for a validation."""
    k = spec.eval_every_epochs
    return k > 0 and (ended_epoch + 1) % k == 0


def metric_value(evaluation: Evaluation, metric: str) -> float | None:
    """The named metric of an evaluation, or None if its task does not report it."""
    value = getattr(evaluation, metric, None)
    return float(value) if value is not None else None


def early_stop_reason(spec: JobSpec, history: Sequence[ValidationRecord]) -> str | None:
    """Why training should stop now (the watched metric has not improved on its best for
    ``early_stopping_patience`` validations in a row), or None. Raises ValueError when the
    job's task does not report the metric."""
    metric = spec.early_stopping_metric
    if not metric or not history:
        return None
    larger_is_better = EARLY_STOPPING_METRICS[metric]
    values = []
    for row in history:
        value = metric_value(row.evaluation, metric)
        if value is None:
            raise ValueError(
                f"early_stopping_metric {metric!r} is not a metric of a {row.evaluation.task} job"
            )
        values.append(value)
    best_at = max(range(len(values)), key=lambda i: (values[i] if larger_is_better else -values[i], -i))
    since = len(values) - 1 - best_at
    if since < spec.early_stopping_patience:
        return None
    return (
        f"early stopping: validation {metric} has not improved on its best {values[best_at]:.4f} "
        f"(epoch {history[best_at].epoch}) for {since} validation(s)"
    )
