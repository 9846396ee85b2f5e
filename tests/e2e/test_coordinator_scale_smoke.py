"""bench/coordinator_scale.py still runs: a real coordinator process, simulated servers and workers.

A smoke run of the simulator that measures issue 14's coordinator goals (no timing asserted here):
a dozen workers for a few seconds, with the SQLite state directory; and bench/grpc_messages.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "coordinator_scale.py"

pytestmark = pytest.mark.e2e


def test_simulated_workers_lease_complete_and_heartbeat(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--workers", "12", "--seconds", "4", "--client-procs", "1",
         "--configs", "state", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == ["state"]
    for row in rows:
        assert row["job_state"] == "JOB_STATE_TRAINING", row
        assert row["protocol"] == "stream", row  # the worker's: beats on HeartbeatStream
        assert row["heartbeats"] > 0, row
        assert row["shards_completed"] > 0, row


def test_the_per_message_cost_bench_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH.with_name("grpc_messages.py")), "--clients", "4", "--seconds", "0.5",
         "--repeats", "1"],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("sync |", "aio |"))]
    assert len(rows) == 4, done.stdout
