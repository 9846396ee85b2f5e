"""Losses, the task rule, target shaping and the task's metrics (lepton.tasks, workloads.evaluate),
against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lepton.config import JobSpec
from lepton.errors import ConfigError
from lepton.tasks import Evaluation, resolve_loss, resolve_task, shape_target
from lepton.workloads import build_model, check_loss, evaluate, load_workload


def huber() -> nn.Module:
    """A user's loss factory, referenced as ``unit.test_tasks:huber``."""
    return nn.HuberLoss(delta=0.5)


def not_a_loss() -> int:
    return 3


def broken_loss():
    raise RuntimeError("no loss today")


def scores(outputs: list, targets: list, **kwargs) -> Evaluation:
    """``evaluate`` of a model that outputs its input: the outputs are the samples."""
    x = torch.tensor(outputs, dtype=torch.float32)
    y = torch.tensor(targets)
    return evaluate(nn.Identity(), TensorDataset(x, y), kwargs.pop("num_classes", 0), batch_size=2, **kwargs)


# --- the task rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "task"),
    [("cross_entropy", "classification"), ("nll", "classification"), ("bce_with_logits", "classification"),
     ("mse", "regression"), ("l1", "regression")],
)  # fmt: skip
def test_auto_task_follows_a_builtin_loss_whatever_the_labels(loss, task):
    assert resolve_task("auto", loss, torch.float32) == task
    assert resolve_task("auto", loss, torch.int64) == task


def test_auto_task_of_a_custom_loss_follows_the_labels_dtype():
    assert resolve_task("auto", "unit.test_tasks:huber", torch.float32) == "regression"
    assert resolve_task("auto", "unit.test_tasks:huber", torch.float64) == "regression"
    assert resolve_task("auto", "unit.test_tasks:huber", torch.int64) == "classification"
    assert resolve_task("auto", "unit.test_tasks:huber", torch.bool) == "classification"


def test_an_explicit_task_wins_for_a_custom_loss_and_must_agree_with_a_builtin_one():
    assert resolve_task("classification", "unit.test_tasks:huber", torch.float32) == "classification"
    assert resolve_task("regression", "mse", torch.int64) == "regression"
    with pytest.raises(ConfigError, match="contradicts loss mse"):
        resolve_task("classification", "mse", torch.float32)
    with pytest.raises(ConfigError, match="task must be one of"):
        resolve_task("ranking", "mse", torch.float32)


def test_job_spec_refuses_an_unknown_task_and_an_empty_loss():
    with pytest.raises(ConfigError, match="task must be one of"):
        JobSpec(task="ranking")
    with pytest.raises(ConfigError, match="loss must be named"):
        JobSpec(loss="")
    assert (JobSpec().loss, JobSpec().task) == ("cross_entropy", "auto")


# --- losses --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("cross_entropy", nn.CrossEntropyLoss), ("nll", nn.NLLLoss), ("bce_with_logits", nn.BCEWithLogitsLoss),
     ("mse", nn.MSELoss), ("l1", nn.L1Loss)],
)  # fmt: skip
def test_builtin_losses_are_torch_modules_with_mean_reduction(name, cls):
    loss = resolve_loss(name)
    assert type(loss) is cls and loss.reduction == "mean"


def test_a_custom_loss_is_what_its_factory_returns():
    loss = resolve_loss("unit.test_tasks:huber")
    assert isinstance(loss, nn.HuberLoss) and loss.delta == 0.5


@pytest.mark.parametrize(
    ("name", "message"),
    [("hinge", "unknown loss 'hinge'"), ("unit.test_tasks:nothing", "has no attribute 'nothing'"),
     ("no_such_module:loss", "cannot import 'no_such_module'"),
     ("unit.test_tasks:not_a_loss", "returned int, not a callable"),
     ("unit.test_tasks:broken_loss", "raised RuntimeError: no loss today")],
)  # fmt: skip
def test_a_loss_that_cannot_be_had_is_a_config_error_saying_why(name, message):
    with pytest.raises(ConfigError, match=message):
        resolve_loss(name)


def test_mse_targets_meet_a_one_output_model_without_reshaping():
    output = torch.tensor([[1.0], [3.0]])
    target = torch.tensor([2, 3])  # integer labels [n]: cast and given the output's last dimension
    shaped = shape_target("mse", "regression", output, target)
    assert shaped.shape == (2, 1) and shaped.dtype == torch.float32
    # no broadcasting to [2, 2]: (1 - 2)² and (3 - 3)² over 2 values
    assert float(resolve_loss("mse")(output, shaped)) == pytest.approx(0.5)
    assert shape_target("unit.test_tasks:huber", "regression", output, target).shape == (2, 1)
    wide = torch.zeros(2, 3)
    assert shape_target("mse", "regression", wide, torch.ones(2, 3)).shape == (2, 3)
    ids = torch.tensor([1, 0])
    assert shape_target("cross_entropy", "classification", wide, ids) is ids
    # a custom classification loss gets the labels as they are
    assert shape_target("unit.test_tasks:huber", "classification", output, ids) is ids


def test_check_loss_refuses_a_loss_that_does_not_fit_the_data():
    diabetes = load_workload("diabetes", 0)
    model = build_model("mlp", diabetes, 0)
    check_loss(model, diabetes, "mse", "regression")
    with pytest.raises(ConfigError, match="real-valued labels: a regression loss"):
        check_loss(model, diabetes, "cross_entropy", "classification")
    digits = load_workload("digits", 0)
    with pytest.raises(ConfigError, match="needs 0/1 labels"):
        check_loss(build_model("mlp", digits, 0, output_dim=1), digits, "bce_with_logits", "classification")


# --- output width --------------------------------------------------------------------------------


def test_the_mlp_output_width_follows_the_task():
    digits, diabetes = load_workload("digits", 0), load_workload("diabetes", 0)
    assert digits.output_dim("classification", "cross_entropy") == 10
    assert digits.output_dim("regression", "mse") == 1  # class ids as numbers: one value
    assert digits.output_dim("classification", "bce_with_logits") == 1
    assert diabetes.output_dim("regression", "mse") == 1
    assert build_model("mlp", diabetes, 0, diabetes.output_dim("regression", "mse"))[-1].out_features == 1
    assert build_model("mlp", digits, 0)[-1].out_features == 10  # default: one logit per class


def test_diabetes_is_standardised_on_its_training_split_with_a_fixed_split():
    a, b = load_workload("diabetes", 0), load_workload("diabetes", 7)
    (x, y), (xt, yt) = a.train.tensors, a.test.tensors
    assert (len(y), len(yt), a.input_dim, a.num_classes, y.dtype) == (353, 89, 10, 0, torch.float32)
    assert torch.equal(y, b.train.tensors[1]) and torch.equal(xt, b.test.tensors[0])
    assert float(y.mean()) == pytest.approx(0.0, abs=1e-5) and float(y.std()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(x.mean(0), torch.zeros(10), atol=1e-5)


# --- metrics -------------------------------------------------------------------------------------


def test_classification_metrics_by_hand():
    # true:      0  0  0  1  1  2
    # predicted: 0  1  0  1  1  0
    logits = [[9, 0, 0], [0, 9, 0], [9, 0, 0], [0, 9, 0], [0, 9, 0], [9, 0, 0]]
    e = scores(logits, [0, 0, 0, 1, 1, 2], num_classes=3)
    assert e.task == "classification"
    assert e.confusion_matrix == ((2, 1, 0), (0, 2, 0), (1, 0, 0))
    assert e.accuracy == pytest.approx(4 / 6)
    assert e.per_class_recall == pytest.approx((2 / 3, 1.0, 0.0))
    assert e.macro_recall == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert e.loss == pytest.approx(
        float(nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float32), torch.tensor([0, 0, 0, 1, 1, 2])))
    )
    assert (e.mse, e.mae, e.r2) == (None, None, None)


def test_a_class_absent_from_the_test_split_has_no_recall_and_no_say_in_macro_recall():
    e = scores([[9, 0, 0], [0, 0, 9]], [0, 0], num_classes=3)
    assert e.confusion_matrix == ((1, 0, 1), (0, 0, 0), (0, 0, 0))
    assert e.per_class_recall[0] == 0.5 and math.isnan(e.per_class_recall[1]) and math.isnan(e.per_class_recall[2])
    assert e.macro_recall == 0.5 and e.accuracy == 0.5


def test_binary_bce_with_logits_predicts_positive_above_zero_logit():
    # true 1 1 0 0 1, logits 2 -1 -3 0.5 0 (0 is not above 0): TP 1, FN 2, TN 1, FP 1
    e = scores([[2.0], [-1.0], [-3.0], [0.5], [0.0]], [1, 1, 0, 0, 1], loss="bce_with_logits")
    assert e.confusion_matrix == ((1, 1), (2, 1))
    assert e.accuracy == pytest.approx(2 / 5)
    assert e.per_class_recall == pytest.approx((1 / 2, 1 / 3))
    assert e.macro_recall == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_multi_label_bce_with_logits_counts_every_sample_label_decision():
    # label 0: truth 1 1 0, predicted 1 0 0; label 1: truth 0 1 1, predicted 1 1 1
    e = scores([[1.0, 1.0], [-1.0, 2.0], [-2.0, 3.0]], [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], loss="bce_with_logits")
    assert e.confusion_matrix == ((1, 1), (1, 3))  # (TN, FP), (FN, TP) over 6 decisions
    assert e.accuracy == pytest.approx(4 / 6)
    assert e.per_class_recall == pytest.approx((1 / 2, 1.0))  # per label, of its positives
    assert e.macro_recall == pytest.approx(0.75)


def test_regression_metrics_by_hand():
    # predictions 1 2 4 6 against 1 3 3 5: errors 0 -1 1 1; mean target 3, SS_tot 4 + 0 + 0 + 4 = 8
    e = scores([[1.0], [2.0], [4.0], [6.0]], [1.0, 3.0, 3.0, 5.0], task="regression", loss="mse")
    assert e.task == "regression" and e.accuracy is None and e.confusion_matrix == ()
    assert e.mse == pytest.approx(3 / 4)
    assert e.mae == pytest.approx(3 / 4)
    assert e.r2 == pytest.approx(1 - 3 / 8)
    assert e.loss == pytest.approx(3 / 4)  # the job's loss, MSE, on a 1-output model with labels [n]


def test_r2_is_averaged_over_outputs_and_l1_is_the_loss_when_chosen():
    # output 0: predictions 0 2 against 0 1 (SS_res 1, SS_tot 0.5); output 1: exact (R² 1)
    e = scores([[0.0, 5.0], [2.0, 7.0]], [[0.0, 5.0], [1.0, 7.0]], task="regression", loss="l1")
    assert e.r2 == pytest.approx(((1 - 1 / 0.5) + 1.0) / 2)
    assert e.mse == pytest.approx(1 / 4) and e.mae == pytest.approx(1 / 4)
    assert e.loss == pytest.approx(1 / 4)


def test_r2_of_a_constant_target_is_one_when_exact_else_zero():
    assert scores([[2.0], [2.0]], [2.0, 2.0], task="regression", loss="mse").r2 == 1.0
    assert scores([[2.0], [3.0]], [2.0, 2.0], task="regression", loss="mse").r2 == 0.0


def test_an_evaluation_restores_from_its_saved_state_old_or_new():
    e = scores([[9, 0], [0, 9]], [0, 1], num_classes=2)
    import dataclasses
    import json

    assert Evaluation.from_state(json.loads(json.dumps(dataclasses.asdict(e)))) == e
    old = {"accuracy": 0.9, "macro_recall": 0.8, "loss": 0.3, "samples": 50, "inference_samples_per_second": 1.0}
    assert Evaluation.from_state(old) == Evaluation(0.9, 0.8, 0.3, 50, 1.0)
