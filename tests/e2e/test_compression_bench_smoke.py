"""bench/compression.py still runs: `lepton up` (2 workers x 1 server) trains digits for one epoch
uncompressed and with sign pushes (fp16 and top-k train whole jobs in
tests/integration/test_compressed_training.py), and each reports bytes per push and an accuracy.
No timing is asserted; the figures come from the full run (CHANGELOG)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "compression.py"

pytestmark = pytest.mark.e2e


def test_sign_pushes_fewer_bytes_and_still_learns(tmp_path):
    out = tmp_path / "compression.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--compressions", "none,sign", "--json", str(out)],
        capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    runs = {kind: run for kind, (run,) in json.loads(out.read_text())["runs"].items()}
    assert set(runs) == {"none", "sign"}
    for kind, run in runs.items():
        assert run["pushes"] > 0 and run["seconds"] > 0, (kind, run)
        assert 0.3 < run["accuracy"] <= 1.0, (kind, run)  # one epoch of digits learns well past chance (0.1)
        assert run["samples"] == runs["none"]["samples"], runs  # the same batches
    raw = runs["none"]["bytes_per_push"]
    assert runs["sign"]["bytes_per_push"] < raw / 10, runs  # 1 bit an element, not 32
    assert "saving" in done.stdout
