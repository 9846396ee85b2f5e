"""bench/compression.py still runs: `lepton up` (2 workers x 1 server) trains digits for one epoch
uncompressed, with top-k and with sign pushes, and each reports bytes per push and an accuracy.
No timing is asserted; the figures come from the full run (CHANGELOG)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "compression.py"

pytestmark = pytest.mark.e2e


def test_compressed_runs_push_fewer_bytes_and_still_learn(tmp_path):
    out = tmp_path / "compression.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--compressions", "none,topk,sign", "--json", str(out)],
        capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    runs = {kind: run for kind, (run,) in json.loads(out.read_text())["runs"].items()}
    assert set(runs) == {"none", "topk", "sign"}
    for kind, run in runs.items():
        assert run["pushes"] > 0 and run["seconds"] > 0, (kind, run)
        assert 0.3 < run["accuracy"] <= 1.0, (kind, run)  # one epoch of digits learns well past chance (0.1)
        assert run["samples"] == runs["none"]["samples"], runs  # the same batches
    raw = runs["none"]["bytes_per_push"]
    assert runs["topk"]["bytes_per_push"] < raw / 10 and runs["sign"]["bytes_per_push"] < raw / 10, runs
    assert "saving" in done.stdout
