"""bench/training.py still runs: one PyTorch process, DDP-gloo with 2 processes and `lepton up`
(2 workers x 1 server) train digits for one epoch, and each reports samples and an accuracy.
No timing is asserted; the throughput figures come from the full run (docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "training.py"

pytestmark = pytest.mark.e2e


def test_single_ddp_and_lepton_train_the_same_job(tmp_path):
    out = tmp_path / "training.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    runs = json.loads(out.read_text())["digits"]["runs"]
    assert set(runs) == {"single", "ddp", "lepton"}
    single = runs["single"][0]
    for kind, (run,) in runs.items():
        assert run["seconds"] > 0, (kind, run)
        assert 0.5 < run["accuracy"] <= 1.0, (kind, run)  # one epoch of digits learns well past chance
    # Same data and batches: DDP trains whole pairs of the single process's batches, Lepton all of them.
    assert runs["lepton"][0]["samples"] == single["samples"]
    assert 0 <= single["samples"] - runs["ddp"][0]["samples"] < 32, runs  # at most one batch an epoch
    assert "vs ddp" in done.stdout
