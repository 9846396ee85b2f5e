"""bench/dataplane.py still runs end to end (every path, every table row) on small payloads, so
the side-by-side benchmark cannot rot. No timing is asserted: the run only has to finish and
check its answers (it exits non-zero when Lepton or torch RPC answer wrong values)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "dataplane.py"


def test_dataplane_bench_quick_run_prints_every_row(tmp_path):
    out = tmp_path / "dataplane.json"
    run = subprocess.run(
        [sys.executable, "-W", "ignore", str(BENCH), "--quick", "--no-tunables", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"push+pull 0.25 MiB", "digits-MLP step (19 KB) through 2 servers"}
    assert set(results["digits-MLP step (19 KB) through 2 servers"]) == {
        "lepton", "lepton, no pool", "lepton shm", "lepton shm, no pool", "torch RPC", "gloo", "raw TCP"
    }
    assert "lepton shm" in results["push+pull 0.25 MiB"]
    assert "| push+pull 0.25 MiB |" in run.stdout
