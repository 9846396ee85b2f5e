"""``lepton up`` with a configuration that cannot work exits 2 within seconds with the reason on
its console; a module in the current directory works without PYTHONPATH; an optimizer that fails
mid-job fails the job at once with its reason in the report. Real processes on loopback."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from support import lepton_argv, read_json, tagged_pids

pytestmark = pytest.mark.e2e
REFUSAL_DEADLINE_S = 20.0  # the bound: refused "within 20 s"
RUN_TIMEOUT_S = 300

BROKEN_FACTORY = """
def net(input_dim, num_classes):
    raise RuntimeError(f"no weights for {input_dim} inputs")
"""

REFUSALS = {
    "betas-of-length-3": (
        ["--optimizer", "adam", "--optimizer-kwargs", json.dumps({"betas": [0.9, 0.99, 0.9]})],
        "fails its first step: ValueError: too many values to unpack",
    ),
    "lbfgs": (["--optimizer", "lbfgs"], "optimizer LBFGS cannot be served by parameter servers: it needs a closure"),
    "sparseadam-on-a-dense-model": (
        ["--optimizer", "sparseadam"], "RuntimeError: SparseAdam does not support dense gradients",
    ),
    "lr-inf": (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    "unknown-optimizer": (["--optimizer", "nosuchopt"], "no optimizer 'nosuchopt' in torch.optim"),
    "unknown-dataset": (["--dataset", "nosuchdata"], "unknown dataset 'nosuchdata': built-in ones are digits"),
    "factory-that-raises": (
        ["--model", "broken_models.py:net"],
        "broken_models.py:net' raised RuntimeError: no weights for 64 inputs",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_lepton_up_refuses_a_configuration_that_cannot_work_with_exit_2_and_the_reason(
    processes, tmp_path, case, record_property
):
    flags, reason = REFUSALS[case]
    (tmp_path / "broken_models.py").write_text(BROKEN_FACTORY)
    started = time.monotonic()
    proc = processes.start(
        "up", lepton_argv("up", "--state-dir", str(tmp_path / "state"), "--epochs", "1", *flags), cwd=tmp_path
    )
    code = proc.wait(timeout=RUN_TIMEOUT_S)
    elapsed_s = time.monotonic() - started
    record_property("seconds", round(elapsed_s, 2))
    console = processes.log("up")
    assert code == 2, console
    assert elapsed_s < REFUSAL_DEADLINE_S, f"refused after {elapsed_s:.1f}s"
    last = console.strip().splitlines()[-1]
    assert last.startswith("lepton up: ") and reason in last, console
    assert "Traceback" not in console and "see " not in last, console
    assert tagged_pids(processes.tag) == []


def test_a_model_module_in_the_current_directory_trains_without_pythonpath(processes, tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        from torch import nn

        def net(input_dim, num_classes):
            return nn.Sequential(nn.Linear(input_dim, 32), nn.ReLU(), nn.Linear(32, num_classes))
    """))
    report_path = tmp_path / "report.json"
    proc = processes.start(
        "up",
        lepton_argv("up", "--model", "mymodels:net", "--epochs", "2", "--workers", "2", "--ps", "2",
                    "--report", str(report_path), "--state-dir", str(tmp_path / "state")),
        cwd=tmp_path,
    )
    code = proc.wait(timeout=RUN_TIMEOUT_S)
    report = read_json(report_path)
    assert code == 0 and report is not None, processes.log("up")
    assert report["status"] == "succeeded" and report["model"] == "mymodels:net"
    # the 32-wide hidden layer is this module's, not the built-in mlp's 64
    tensors = [t for s in report["layout"]["servers"].values() for t in s["tensors"]]
    assert sum(s["bytes"] for s in report["layout"]["servers"].values()) == 4 * (64 * 32 + 32 + 32 * 10 + 10)
    assert any(t.startswith("0.weight") for t in tensors)
    assert report["test_accuracy"] > 0.8
    assert tagged_pids(processes.tag) == []


def test_an_optimizer_that_fails_mid_job_fails_lepton_up_with_its_reason(processes, tmp_path):
    # Every process finds the test-only torch.optim.FailsAtThirdStep (sitecustomize.py there).
    processes.extra_env["PYTHONPATH"] = str(Path(__file__).parent / "failing_optimizer")
    report_path = tmp_path / "report.json"
    started = time.monotonic()
    proc = processes.start(
        "up",
        lepton_argv("up", "--optimizer", "failsatthirdstep", "--lr", "0.1", "--epochs", "50", "--timeout", "240",
                    "--report", str(report_path), "--state-dir", str(tmp_path / "state")),
    )
    code = proc.wait(timeout=RUN_TIMEOUT_S)
    elapsed_s = time.monotonic() - started
    report = read_json(report_path)
    console = processes.log("up")
    assert code == 3 and report is not None, console
    reason = "optimizer failsatthirdstep failed at update 3: RuntimeError: injected failure at step 3"
    assert report["status"] == "failed" and reason in report["failure"], report.get("failure")
    assert report["failure"].startswith("parameter server ps-")
    assert report["final_status"]["failure"] == report["failure"]  # as `lepton status --json` showed it
    assert f"failure: {report['failure']}" in console
    # failed long before the 240 s timeout, and nothing was quarantined while it idled
    assert report["shard_completions"] < 50 * report["shards_per_epoch"]
    assert report["quarantined_shards"] == []
    print(f"lepton up exited after {elapsed_s:.1f}s; the job failed {report['training_seconds']:.2f}s into training")
    assert tagged_pids(processes.tag) == []
