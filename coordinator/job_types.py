"""The coordinator job's value types: its states, what its operations answer, and its status."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from coordinator.checkpoints import Checkpoint
from coordinator.ledger import Lease
from coordinator.membership import Member
from coordinator.validation import ValidationRecord
from lepton.config import JobSpec
from lepton.domain import HeartbeatReply, JobState, LeaseOutcome, WorkerView  # noqa: F401 - importable from here
from lepton.errors import InvalidArgument
from lepton.tasks import REGRESSION, Evaluation
from lepton.tensors import TensorSpec

MAX_FAILURE_REASON_CHARS = 2000


@dataclass(frozen=True)
class LeaseDecision:
    outcome: LeaseOutcome
    lease: Lease | None = None
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class Assignment:
    layout_version: int
    tensors: tuple[TensorSpec, ...]
    values: Mapping[str, torch.Tensor]


# What the evaluating worker reports: the task's metrics (lepton.tasks).
EvaluationResult = Evaluation


def evaluation_problem(result: EvaluationResult) -> str | None:
    """Why a reported evaluation cannot be true, or None."""
    if not (math.isfinite(result.loss) and result.samples >= 0):
        return "the evaluation's loss must be finite and its samples >= 0"
    if not (math.isfinite(result.inference_samples_per_second) and result.inference_samples_per_second >= 0):
        return "inference_samples_per_second must be a finite number >= 0"
    if result.task == REGRESSION:
        values = (result.mse, result.mae, result.r2)
        if any(v is None or not math.isfinite(v) for v in values) or result.mse < 0 or result.mae < 0 or result.r2 > 1:  # type: ignore[operator]
            return "regression metrics need mse >= 0, mae >= 0 and r2 <= 1"
        return None
    if not (0.0 <= (result.accuracy or 0.0) <= 1.0 and 0.0 <= (result.macro_recall or 0.0) <= 1.0):
        return "accuracy and macro_recall must lie in [0, 1]"
    if any(not 0.0 <= r <= 1.0 for r in result.per_class_recall if r == r):  # NaN: class absent
        return "per_class_recall must lie in [0, 1]"
    sizes = {len(row) for row in result.confusion_matrix}
    if result.confusion_matrix and sizes != {len(result.confusion_matrix)}:
        return "confusion_matrix must be square"
    if any(c < 0 for row in result.confusion_matrix for c in row):
        return "confusion_matrix counts must be >= 0"
    return None


def describe_evaluation(result: EvaluationResult) -> str:
    """The headline metrics as one line of text (events, logs)."""
    if result.task == REGRESSION:
        return f"mse {result.mse:.4f}, mae {result.mae:.4f}, r2 {result.r2:.4f}, loss {result.loss:.4f}"
    return f"accuracy {result.accuracy:.4f}, macro recall {result.macro_recall:.4f}, loss {result.loss:.4f}"


@dataclass(frozen=True)
class MemberSnapshot:
    member: Member
    heartbeat_age_s: float
    lease: Lease | None
    # Whether the member runs: alive in the table and, once the job is over (nobody is declared
    # dead then), heard from within the heartbeat timeout; a silent one has exited.
    alive: bool = True


@dataclass(frozen=True)
class JobStatus:
    spec: JobSpec
    state: JobState
    epoch: int
    shards_completed_in_epoch: int
    shards_leased: int
    shards_pending: int
    shard_completions: int
    duplicate_completions_rejected: int
    reassignments: int
    members_declared_dead: int
    samples_trained: int
    samples_per_second: float
    recent_loss: float
    training_seconds: float
    layout_version: int
    members: tuple[MemberSnapshot, ...]
    evaluation: EvaluationResult | None
    failure: str = ""
    ps_restarts: int = 0
    steps_rolled_back: int = 0
    quarantined_shards: tuple[int, ...] = ()
    leases_expired: int = 0
    last_checkpoint: Checkpoint | None = None  # the newest complete coordinated checkpoint
    validation: tuple[ValidationRecord, ...] = ()  # validations during training, oldest first
    stopped_early: str = ""  # why training ended before its last epoch
    validating: bool = False  # a validation is due or under way (no lease is granted meanwhile)


def check_observation(what: str, loss: float | None, samples: int, most: int) -> None:
    """A reported mean loss (None: the worker has none) and the samples it averages over: finite,
    and 0..``most`` samples (no report covers more samples than its shard holds). Raises
    InvalidArgument."""
    if loss is not None and not math.isfinite(loss):
        raise InvalidArgument(
            f"{what}: loss must be a finite number, got {loss}; set loss_unknown for no loss"
        )
    if not 0 <= samples <= most:
        raise InvalidArgument(f"{what}: samples must lie in [0, {most}] (the shard's size), got {samples}")


@dataclass
class Progress:
    samples: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=32))  # (loss, samples)

    def add(self, loss: float | None, samples: int) -> None:
        """Counts a report's loss into recent_loss (a report without one leaves it alone)."""
        if loss is not None and samples > 0:
            self.recent.append((loss, samples))

    @property
    def recent_loss(self) -> float:
        total = sum(n for _, n in self.recent)
        return sum(loss * n for loss, n in self.recent) / total if total else float("nan")
