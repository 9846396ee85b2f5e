"""A finished `lepton up` job exported with `lepton export` loads into a plain PyTorch model and
scores exactly the test accuracy the job reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lepton.ops.export import find_manifest
from lepton.workloads import build_model, load_workload, take
from support import lepton_argv, read_json

pytestmark = pytest.mark.e2e
RUN_TIMEOUT_S = 300


def test_exported_final_checkpoint_gives_the_reported_test_accuracy(processes, tmp_path):
    state, report_path, out = tmp_path / "state", tmp_path / "report.json", tmp_path / "model.pt"
    up = processes.start(
        "up", lepton_argv("up", "--epochs", "3", "--state-dir", str(state), "--report", str(report_path))
    )
    up.wait(timeout=RUN_TIMEOUT_S)
    report = read_json(report_path)
    assert up.returncode == 0 and report is not None and report["status"] == "succeeded", processes.log("up")
    # The newest complete manifest (what export picks) is the final one, taken once training ended.
    manifest = json.loads(find_manifest(state).read_text())
    assert manifest["final"] and sorted(manifest["reports"]) == ["ps-0", "ps-1"], manifest

    export = processes.start("export", lepton_argv("export", "--checkpoint", str(state), "--out", str(out)))
    assert export.wait(timeout=120) == 0, processes.log("export")
    assert manifest["checkpoint_id"] in processes.log("export")

    # Plain PyTorch from here on: the job's model factory, the exported state_dict, the test split.
    workload = load_workload(report["dataset"], 0)
    model = build_model(report["model"], workload, 0)
    model.load_state_dict(torch.load(out, weights_only=True))
    model.eval()
    with torch.no_grad():
        x, y = take(workload.test, torch.arange(len(workload.test)))
        accuracy = float((model(x).argmax(dim=1) == y).sum()) / len(y)
    assert accuracy == report["test_accuracy"], (accuracy, report["test_accuracy"])
    print(f"exported accuracy {accuracy:.6f} == reported {report['test_accuracy']:.6f}; final checkpoint "
          f"{manifest['checkpoint_id']} {manifest['reports']} after {manifest['completed_after_s']:.3f}s")


def test_a_batchnorm_model_exports_its_running_statistics_and_loads_strictly(processes, tmp_path):
    """BatchNorm's buffers travel with the parameters: the export is the model's whole state_dict
    (strict load), its running statistics are trained ones, and plain torch re-evaluates the
    export to the accuracy the job reported (evaluation used the same statistics)."""
    processes.extra_env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # tests/: integration.*
    state, report_path, out = tmp_path / "state", tmp_path / "report.json", tmp_path / "model.pt"
    model_name = "integration.custom_workload:batchnorm_mlp"
    up = processes.start(
        "up",
        lepton_argv(
            "up", "--model", model_name, "--epochs", "3", "--state-dir", str(state), "--report", str(report_path)
        ),
    )
    up.wait(timeout=RUN_TIMEOUT_S)
    report = read_json(report_path)
    assert up.returncode == 0 and report is not None and report["status"] == "succeeded", processes.log("up")
    export = processes.start("export", lepton_argv("export", "--checkpoint", str(state), "--out", str(out)))
    assert export.wait(timeout=120) == 0, processes.log("export")

    workload = load_workload(report["dataset"], 0)
    fresh = build_model(model_name, workload, 0)
    exported = torch.load(out, weights_only=True)
    assert exported["1.num_batches_tracked"].item() > 0
    assert not torch.equal(exported["1.running_mean"], fresh.state_dict()["1.running_mean"])
    fresh.load_state_dict(exported, strict=True)
    fresh.eval()
    with torch.no_grad():
        x, y = take(workload.test, torch.arange(len(workload.test)))
        accuracy = float((fresh(x).argmax(dim=1) == y).sum()) / len(y)
    assert accuracy == report["test_accuracy"], (accuracy, report["test_accuracy"])
    print(f"batchnorm export: accuracy {accuracy:.6f} == reported; num_batches_tracked "
          f"{exported['1.num_batches_tracked'].item()}")
