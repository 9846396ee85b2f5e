"""Validation during training and the curves through ``lepton up``: a sync job with
``--eval-every-epochs 1`` reports one validation row per epoch, and leaves TensorBoard event files
under its state directory and a PNG of its curves next to the report."""

from __future__ import annotations

import pytest

from lepton.tbevents import read_scalars
from support import lepton_argv, read_json

pytestmark = pytest.mark.e2e
EPOCHS = 3


def test_eval_every_epoch_reports_one_validation_row_per_epoch_and_writes_curves(processes, tmp_path):
    report_path = tmp_path / "report.json"
    proc = processes.start(
        "up",
        lepton_argv(
            "up", "--report", str(report_path), "--state-dir", str(tmp_path / "state"),
            "--mode", "sync", "--epochs", str(EPOCHS), "--eval-every-epochs", "1",
        ),
    )
    proc.wait(timeout=300)
    report = read_json(report_path)
    assert report is not None and proc.returncode == 0, processes.log("up")

    rows = report["validation"]
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert [r["final"] for r in rows] == [False] * (EPOCHS - 1) + [True]
    assert rows[-1]["accuracy"] == report["test_accuracy"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 and r["samples"] > 0 for r in rows)
    # no worker trains while one validates: each row sees exactly its epochs' samples, and the
    # shards of every epoch were counted once
    per_epoch = report["samples_trained"] // EPOCHS
    assert [r["samples_trained"] for r in rows] == [per_epoch * (e + 1) for e in range(EPOCHS)]
    assert report["observed_completions_per_epoch"] == [report["shards_per_epoch"]] * EPOCHS
    assert report["observed_shards_completed_more_than_once"] == 0
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and steps[0] > 0
    assert rows[-1]["accuracy"] >= 0.9  # digits in sync mode after 3 epochs

    files = list((tmp_path / "state" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    tags = {tag for tag, *_ in read_scalars(files[0])}
    assert {"train/loss", "validation/accuracy", "validation/loss"} <= tags
    assert any(t.startswith("samples_per_second/worker") for t in tags)
    assert any(t.startswith("push_latency_ms/worker") for t in tags)
    validation = [(step, value) for tag, step, value, _ in read_scalars(files[0]) if tag == "validation/accuracy"]
    assert [step for step, _ in validation] == [r["samples_trained"] for r in rows]
    assert report["curves_png"] == str(tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
