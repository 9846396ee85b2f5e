"""``lepton up --dataset parquet:DIR``: workers read their shards' rows through DataLoader
processes; the job trains, and every member reports its peak memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from support import lepton_argv, read_json

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import make_parquet  # noqa: E402


def test_lepton_up_trains_a_parquet_data_set_with_loader_processes(processes, tmp_path):
    pytest.importorskip("pyarrow")
    data = tmp_path / "data"
    make_parquet.write(data, train_rows=6000, test_rows=1000, features=32, classes=4, fmt="parquet", files=3, seed=3,
                       chunk_rows=1000)
    report_path = tmp_path / "report.json"
    proc = processes.start("up", lepton_argv(
        "up", "--dataset", f"parquet:{data}", "--mode", "sync", "--workers", "2", "--ps", "1", "--epochs", "2",
        "--batch-size", "64", "--lr", "0.003", "--shards", "6", "--loader-workers", "1",
        "--report", str(report_path), "--state-dir", str(tmp_path / "state"),
    ))
    proc.wait(timeout=300)
    report = read_json(report_path)
    assert report is not None and proc.returncode == 0, processes.log("up")
    assert report["status"] == "succeeded" and report["shard_completions"] == 12
    assert report["test_accuracy"] >= 0.9, report["test_accuracy"]
    members = report["members"]
    assert all(m["peak_rss_mb"] > 50 for m in members.values()), members
    # the DataLoader's processes ran, and were reaped by the worker
    assert all(members[w]["children_peak_rss_mb"] > 0 for w in ("worker-0", "worker-1")), members
