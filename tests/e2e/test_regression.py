"""A regression job (MSE on scikit-learn's diabetes) through ``lepton up``, against the same job
trained by plain PyTorch in one process (bench/reference.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from lepton.config import JobSpec
from support import lepton_argv, read_json, tagged_pids

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parents[2] / "bench" / "reference.py"
# 353 training samples, 20 epochs of batch 32 in 4 shards: 240 updates, about 2 s of training.
SPEC = JobSpec(
    dataset="diabetes", loss="mse", epochs=20, batch_size=32, lr=0.001, shards_per_epoch=4,
    parameter_servers=2, seed=0,
)  # fmt: skip
# The test split has 89 samples. Single-process runs of this job score R² 0.601 / 0.572 / 0.573
# with seeds 0 / 1 / 2, so a 0.05 band around the reference holds one seed's async noise and
# catches a job that does not train (R² about -0.1 untrained) or trains the wrong loss. MSE and
# R² are tied (MSE = (1 - R²) x the test targets' variance, 1.12 here), hence 0.06 on MSE.
R2_TOLERANCE = 0.05
MSE_TOLERANCE = 0.06


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_reference", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_diabetes_regression_trains_through_lepton_up_like_single_process_torch(processes, tmp_path):
    report_path = tmp_path / "report.json"
    flags = [
        "--dataset", SPEC.dataset, "--loss", SPEC.loss, "--epochs", str(SPEC.epochs),
        "--batch-size", str(SPEC.batch_size), "--lr", repr(SPEC.lr), "--shards", str(SPEC.shards_per_epoch),
        "--ps", str(SPEC.parameter_servers), "--seed", str(SPEC.seed), "--workers", "2", "--mode", "async",
    ]  # fmt: skip
    proc = processes.start(
        "up", lepton_argv("up", "--report", str(report_path), "--state-dir", str(tmp_path / "state"), *flags)
    )
    proc.wait(timeout=300)
    report = read_json(report_path)
    assert report is not None, processes.log("up")
    assert proc.returncode == 0 and report["status"] == "succeeded", processes.log("up")
    reference = load_bench().train_reference(SPEC)

    assert report["task"] == reference.task == "regression"
    assert report["loss"] == "mse"
    assert report["test_accuracy"] is None and report["test_confusion_matrix"] is None
    assert abs(report["test_r2"] - reference.test_r2) <= R2_TOLERANCE, (report["test_r2"], reference.test_r2)
    assert abs(report["test_mse"] - reference.test_mse) <= MSE_TOLERANCE, (report["test_mse"], reference.test_mse)
    assert report["test_r2"] > 0.5  # a linear least-squares fit scores 0.577 on this split
    assert report["test_loss"] == pytest.approx(report["test_mse"], rel=1e-6)  # the job's loss is MSE
    assert 0 < report["test_mae"] < 1
    # what `lepton status --json` shows: the regression metrics, and no classification ones
    evaluation = report["final_status"]["evaluation"]
    assert "classification" not in evaluation
    assert evaluation["regression"]["r2"] == pytest.approx(report["test_r2"])
    print(
        f"diabetes mse: lepton r2 {report['test_r2']:.4f} mse {report['test_mse']:.4f}; "
        f"reference r2 {reference.test_r2:.4f} mse {reference.test_mse:.4f}"
    )
    assert tagged_pids(processes.tag) == []


@pytest.mark.parametrize(
    ("flags", "reason"),
    [(["--loss", "hinge"], "unknown loss 'hinge'"),
     (["--dataset", "diabetes", "--loss", "cross_entropy"], "loss 'cross_entropy' does not fit"),
     (["--loss", "mse", "--task", "classification"], "task classification contradicts loss mse")],
)  # fmt: skip
def test_a_loss_that_cannot_train_the_job_stops_the_coordinator_with_exit_2_and_the_reason(flags, reason):
    done = subprocess.run(
        lepton_argv("coordinator", "--listen", "127.0.0.1:0", *flags), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert reason in done.stderr
