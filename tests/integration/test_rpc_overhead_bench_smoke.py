"""bench/rpc_overhead.py still runs: every variant (bare grpcio, lepton.rpc.Server with limits and
error mapping, with metrics, with auth and a worker token) answers its calls and gets a row. No
timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "rpc_overhead.py"


def test_rpc_overhead_bench_quick_run_prints_every_variant():
    run = subprocess.run(
        [sys.executable, "-W", "ignore", str(BENCH), "--quick"], capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "µs" in line]
    assert [row.split(" | ")[0][2:] for row in rows] == [
        "bare grpc", "lepton", "lepton + metrics", "lepton + metrics + auth"
    ]
