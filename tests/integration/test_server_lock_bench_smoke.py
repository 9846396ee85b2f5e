"""bench/server_lock.py still runs (async and sync, periodic checkpoints on) and reports every
figure. No timing is asserted: the run only has to finish and print its fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "server_lock.py"


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_server_lock_bench_quick_run_reports_every_figure(mode):
    run = subprocess.run(
        [sys.executable, "-W", "ignore", str(BENCH), "--quick", "--mode", mode, "--json-line"],
        capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(result) == {
        "pushes_per_s", "latency_p50_ms", "latency_p99_ms", "latency_max_ms", "lock_ms_per_push", "lock_max_ms",
        "lock_cpu_ms_per_push", "lock_cpu_max_ms",
    }
    assert result["pushes_per_s"] > 0 and result["lock_max_ms"] > 0
