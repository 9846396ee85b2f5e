"""What a job learns: its loss (a built-in name or ``package.module:factory``), its task
(classification or regression), how targets are shaped for the loss, and the task's metrics.
Pure torch; the worker trains with it, the coordinator validates with it, the reference uses it.

Rules (also in docs/cli.md):

- Task ``auto`` follows a built-in loss (``cross_entropy``, ``nll``, ``bce_with_logits``:
  classification; ``mse``, ``l1``: regression); with a custom loss it follows the labels' dtype
  (integer or bool: classification, floating: regression). An explicit task that contradicts a
  built-in loss is refused.
- Targets for ``mse``, ``l1``, ``bce_with_logits`` and a custom loss in a regression task are
  cast to the output's dtype, and a target with one dimension fewer than the output whose last
  dimension is 1 (labels ``[n]``, model output ``[n, 1]``) gets that dimension added, so a
  1-output model needs no reshaping (torch would broadcast ``[n, 1]`` against ``[n]`` to
  ``[n, n]``). ``cross_entropy`` and ``nll`` take class ids as they are, and so does a custom
  loss in a classification task.
- Classification metrics: predictions are the argmax of the output, except for
  ``bce_with_logits`` where each logit above 0 is a positive. With one logit a sample
  (binary) the classes are 0 and 1; with several logits a sample (multi-label, targets
  ``[n, K]`` of 0/1) every (sample, label) pair is one decision: accuracy is the fraction of
  decisions right, class k's recall is label k's recall of its positives, and the confusion
  matrix is the 2 x 2 total over all decisions.
- Regression metrics are over every target value: MSE, MAE, and R² = 1 - SS_res / SS_tot per
  output, averaged over outputs (scikit-learn's ``r2_score``; a constant target gives 1.0 when
  predicted exactly, else 0.0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from lepton.config import TASKS
from lepton.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CLASSIFICATION = "classification"
REGRESSION = "regression"

# built-in loss -> (module class, the task it implies)
BUILTIN_LOSSES: dict[str, tuple[type[nn.Module], str]] = {
    "cross_entropy": (nn.CrossEntropyLoss, CLASSIFICATION),
    "nll": (nn.NLLLoss, CLASSIFICATION),
    "bce_with_logits": (nn.BCEWithLogitsLoss, CLASSIFICATION),
    "mse": (nn.MSELoss, REGRESSION),
    "l1": (nn.L1Loss, REGRESSION),
}
# Losses whose targets are values shaped like the output (not class ids).
_VALUE_TARGETS = frozenset({"mse", "l1", "bce_with_logits"})


def resolve_loss(name: str) -> LossFn:
    """The built-in loss of that name, or what ``package.module:factory()`` returns: a callable
    ``(output, target) -> scalar mean loss``. Raises ConfigError when it cannot be had."""
    if name in BUILTIN_LOSSES:
        return BUILTIN_LOSSES[name][0]()
    from lepton.factories import resolve_factory

    try:
        loss = resolve_factory(name)()
    except ConfigError as exc:
        raise ConfigError(f"unknown loss {name!r} (built-in: {', '.join(BUILTIN_LOSSES)}): {exc}") from None
    except Exception as exc:  # a user factory may raise anything; the job cannot start
        raise ConfigError(f"loss factory {name!r} raised {type(exc).__name__}: {exc}") from exc
    if not callable(loss):
        raise ConfigError(f"loss factory {name!r} returned {type(loss).__name__}, not a callable (output, target)")
    return loss


def resolve_task(task: str, loss: str, label_dtype: torch.dtype) -> str:
    """``classification`` or ``regression`` for a job's ``task`` setting (see the module's rules).
    Raises ConfigError for an unknown task or one that contradicts a built-in loss."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    implied = BUILTIN_LOSSES[loss][1] if loss in BUILTIN_LOSSES else None
    if task == "auto":
        if implied is not None:
            return implied
        return REGRESSION if label_dtype.is_floating_point else CLASSIFICATION
    if implied is not None and implied != task:
        raise ConfigError(f"task {task} contradicts loss {loss}, a {implied} loss")
    return task


def shape_target(loss: str, task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The labels as the loss takes them (see the module's rules)."""
    custom_regression = loss not in BUILTIN_LOSSES and task == REGRESSION
    if loss not in _VALUE_TARGETS and not custom_regression:
        return target
    if target.dim() == output.dim() - 1 and output.shape[-1] == 1:
        target = target.unsqueeze(-1)
    return target.to(output.dtype)


@dataclass(frozen=True)
class ClassificationMetrics:
    """Accuracy and recall in [0, 1]. ``per_class_recall[k]`` is NaN for a class absent from the
    test split; ``macro_recall`` is the mean over present classes. ``confusion_matrix[i][j]``
    counts samples of true class i predicted as j."""

    accuracy: float
    macro_recall: float
    per_class_recall: tuple[float, ...]
    confusion_matrix: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class RegressionMetrics:
    """Mean squared and absolute error, in the targets' units (squared for MSE), and R²."""

    mse: float
    mae: float
    r2: float


@dataclass(frozen=True)
class Evaluation:
    """The final model on the test split. Classification sets ``accuracy``, ``macro_recall``,
    ``per_class_recall`` and ``confusion_matrix``; regression sets ``mse``, ``mae`` and ``r2``
    (see the module's rules). ``loss`` is the job's loss, averaged over samples."""

    accuracy: float | None
    macro_recall: float | None
    loss: float
    samples: int
    inference_samples_per_second: float
    task: str = CLASSIFICATION
    per_class_recall: tuple[float, ...] = ()
    confusion_matrix: tuple[tuple[int, ...], ...] = ()
    mse: float | None = None
    mae: float | None = None
    r2: float | None = None

    @classmethod
    def from_state(cls, state: dict) -> Evaluation:
        """From ``dataclasses.asdict`` of one (lists back to tuples; fields it lacks, as saved
        before they existed, take their defaults)."""
        values = dict(state)
        values["per_class_recall"] = tuple(values.get("per_class_recall", ()))
        values["confusion_matrix"] = tuple(tuple(row) for row in values.get("confusion_matrix", ()))
        return cls(**values)


@dataclass
class ClassificationTally:
    """Accumulates a classification evaluation batch by batch."""

    loss: str
    num_classes: int
    confusion: torch.Tensor | None = field(default=None, init=False)

    def add(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if self.loss == "bce_with_logits":
            # one decision per logit; binary or multi-label, the classes are 0 and 1
            predicted = (output > 0).long().reshape(-1)
            truth = shape_target(self.loss, CLASSIFICATION, output, target).long().reshape(-1)
            k = 2
        else:
            # a model may have more outputs than the labels have classes: every output is a class
            predicted, truth = output.argmax(dim=1), target.long().reshape(-1)
            k = max(self.num_classes, output.shape[1])
        if self.confusion is None:
            self.confusion = torch.zeros(k, k, dtype=torch.int64)
        self.confusion += torch.bincount(truth * k + predicted, minlength=k * k).reshape(k, k)

    def metrics(self, per_label_recall: tuple[float, ...] | None = None) -> ClassificationMetrics:
        confusion = self.confusion if self.confusion is not None else torch.zeros(1, 1, dtype=torch.int64)
        counts = confusion.sum(dim=1).double()
        recall = confusion.diagonal().double() / counts  # NaN where a class has no samples
        per_class = tuple(float(r) for r in recall) if per_label_recall is None else per_label_recall
        present = torch.tensor([r == r for r in per_class], dtype=torch.bool)
        values = torch.tensor(per_class, dtype=torch.float64)
        return ClassificationMetrics(
            accuracy=float(confusion.diagonal().sum()) / max(int(confusion.sum()), 1),
            macro_recall=float(values[present].mean()) if present.any() else 0.0,
            per_class_recall=per_class,
            confusion_matrix=tuple(tuple(int(c) for c in row) for row in confusion),
        )


@dataclass
class MultiLabelRecall:
    """Per-label recall of positives for ``bce_with_logits`` with several logits a sample."""

    hits: torch.Tensor | None = None
    positives: torch.Tensor | None = None

    def add(self, output: torch.Tensor, target: torch.Tensor) -> None:
        truth = target.reshape(output.shape) > 0.5
        hit = (truth & (output > 0)).sum(dim=0)
        pos = truth.sum(dim=0)
        self.hits = hit if self.hits is None else self.hits + hit
        self.positives = pos if self.positives is None else self.positives + pos

    def recall(self) -> tuple[float, ...]:
        if self.hits is None or self.positives is None:
            return ()
        return tuple(float(r) for r in self.hits.double() / self.positives.double())


@dataclass
class RegressionTally:
    """Accumulates a regression evaluation batch by batch, in float64 per output column."""

    n: int = 0
    sq: torch.Tensor | None = None
    ab: torch.Tensor | None = None
    y_sum: torch.Tensor | None = None
    y_sq: torch.Tensor | None = None

    def add(self, output: torch.Tensor, target: torch.Tensor) -> None:
        y = target.to(torch.float64).reshape(len(target), -1)
        err = output.to(torch.float64).reshape(y.shape) - y
        parts = (err.square().sum(0), err.abs().sum(0), y.sum(0), y.square().sum(0))
        if self.sq is None:
            self.sq, self.ab, self.y_sum, self.y_sq = parts
        else:
            sums = cast("tuple[torch.Tensor, ...]", (self.sq, self.ab, self.y_sum, self.y_sq))  # set together
            self.sq, self.ab, self.y_sum, self.y_sq = (a + b for a, b in zip(sums, parts, strict=True))
        self.n += len(y)

    def metrics(self) -> RegressionMetrics:
        if self.n == 0 or self.sq is None:
            return RegressionMetrics(mse=0.0, mae=0.0, r2=0.0)
        assert self.ab is not None and self.y_sum is not None and self.y_sq is not None
        values = self.n * len(self.sq)
        ss_tot = (self.y_sq - self.y_sum.square() / self.n).clamp_(min=0.0)
        constant = ss_tot <= 1e-12 * self.y_sq.clamp(min=1.0)
        r2 = torch.where(
            constant,
            (self.sq == 0).double(),
            1.0 - self.sq / torch.where(constant, torch.ones_like(ss_tot), ss_tot),
        )
        return RegressionMetrics(
            mse=float(self.sq.sum()) / values, mae=float(self.ab.sum()) / values, r2=float(r2.mean())
        )
