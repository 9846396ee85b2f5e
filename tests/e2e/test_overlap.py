"""Overlap under ``lepton up`` (real processes over loopback): in async and sync, every worker
pushes during backward (worker/overlap.py), and the job trains digits as without it."""

from __future__ import annotations

import re

import pytest

from support import lepton_argv, read_json

pytestmark = pytest.mark.e2e
RUN_TIMEOUT_S = 300
EPOCHS = 4


def job_done(log: str) -> dict[str, int]:
    """The counters of a worker's job_done log line (console or JSON format)."""
    line = next(line for line in log.splitlines() if "job_done" in line)
    return {k: int(v) for k, v in re.findall(r'"?(\w+)"?[=:] ?(\d+)', line) if k in ("steps", "pushes",
                                                                                     "pushes_during_backward")}


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_workers_push_during_backward_and_the_job_trains(processes, tmp_path, mode):
    report_path, state = tmp_path / "report.json", tmp_path / "state"
    proc = processes.start(
        "up",
        lepton_argv(
            "up", "--report", str(report_path), "--state-dir", str(state), "--workers", "2", "--ps", "2",
            "--epochs", str(EPOCHS), "--mode", mode,
        ),
    )
    proc.wait(timeout=RUN_TIMEOUT_S)
    report = read_json(report_path)
    assert report is not None, processes.log("up")
    assert proc.returncode == 0 and report["status"] == "succeeded", processes.log("up")[-4000:]
    assert report["test_accuracy"] >= 0.9, report["test_accuracy"]
    assert report["restarts"] == {} or sum(report["restarts"].values()) == 0, report["restarts"]
    logs = {p.stem: p.read_text() for p in (state / "logs").glob("worker-*.log")}
    assert sorted(logs) == ["worker-0", "worker-1"], sorted(logs)
    for name, log in logs.items():
        assert "overlap_on" in log and "overlap_off" not in log, name
        counts = job_done(log)
        assert counts["steps"] > 0, (name, counts)
        # both servers hold parameters every batch has gradients for: both start from the hooks
        assert counts["pushes_during_backward"] == 2 * counts["pushes"], (name, counts)
