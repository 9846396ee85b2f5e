"""Evaluating a model on a dataset with the job's task and loss, and checking before training that
the loss fits the data and the model."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lepton.errors import ConfigError
from lepton.tasks import (
    CLASSIFICATION,
    REGRESSION,
    ClassificationMetrics,
    ClassificationTally,
    Evaluation,
    LossFn,
    MultiLabelRecall,
    RegressionMetrics,
    RegressionTally,
    resolve_loss,
    shape_target,
)
from lepton.workloads.workload import Workload, take


def check_loss(model: nn.Module, workload: Workload, loss: str, task: str) -> None:
    """Resolves ``loss`` and computes it on the model's output for the first two training samples
    (no gradient, evaluation mode, so neither parameters nor buffers change), so that a loss that
    does not fit the data or the model is refused before training. Raises ConfigError."""
    loss_fn = resolve_loss(loss)
    x, y = take(workload.train, torch.arange(min(2, len(workload.train))))  # type: ignore[arg-type]
    labels = workload.train.tensors[1] if isinstance(workload.train, TensorDataset) else y
    if loss == "bce_with_logits" and bool(((labels != 0) & (labels != 1)).any()):
        raise ConfigError("loss 'bce_with_logits' needs 0/1 labels (one per logit); these data hold other values")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(x)
            value = loss_fn(output, shape_target(loss, task, output, y))
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise ConfigError(f"loss {loss!r} must return a scalar tensor, got {type(value).__name__}")
    except ConfigError:
        raise
    except Exception as exc:  # torch's own shape and dtype errors say what does not fit
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = " (real-valued labels: a regression loss such as mse)" if y.is_floating_point() else ""
        raise ConfigError(
            f"loss {loss!r} does not fit the data or the model (labels {tuple(y.shape)} {y.dtype}{hint}): "
            f"{type(exc).__name__}: {first}"
        ) from exc
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    batch_size: int = 512,
    *,
    task: str = CLASSIFICATION,
    loss: str = "cross_entropy",
    loss_fn: LossFn | None = None,
) -> Evaluation:
    """The task's metrics and the mean loss of ``model`` on ``dataset``. ``loss`` names the job's
    loss (it decides how targets are shaped and, for ``bce_with_logits``, how logits become
    predictions); ``loss_fn`` is that loss resolved (None: resolved here)."""
    loss_fn = loss_fn if loss_fn is not None else resolve_loss(loss)
    n = len(dataset)  # type: ignore[arg-type]
    classes = ClassificationTally(loss, num_classes)
    labels = MultiLabelRecall()
    values = RegressionTally()
    loss_sum = 0.0
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            x, y = take(dataset, torch.arange(lo, min(n, lo + batch_size)))
            output = model(x)
            # a mean loss, weighted by the batch's size, so the result is the mean over samples
            loss_sum += float(loss_fn(output, shape_target(loss, task, output, y))) * len(y)
            if task == REGRESSION:
                values.add(output, y)
            else:
                classes.add(output, y)
                if loss == "bce_with_logits" and output.dim() > 1 and output.shape[-1] > 1:
                    labels.add(output, y)
    elapsed = max(time.perf_counter() - start, 1e-9)
    model.train()
    common = dict(loss=loss_sum / max(n, 1), samples=n, inference_samples_per_second=n / elapsed, task=task)
    if task == REGRESSION:
        r: RegressionMetrics = values.metrics()
        return Evaluation(accuracy=None, macro_recall=None, mse=r.mse, mae=r.mae, r2=r.r2, **common)  # type: ignore[arg-type]
    c: ClassificationMetrics = classes.metrics(labels.recall() if labels.hits is not None else None)
    return Evaluation(
        accuracy=c.accuracy,
        macro_recall=c.macro_recall,
        per_class_recall=c.per_class_recall,
        confusion_matrix=c.confusion_matrix,
        **common,  # type: ignore[arg-type]
    )
