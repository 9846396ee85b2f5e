"""bench/sparse.py still runs and its byte accounting still holds, on a small table.

The benchmark is the measured evidence of issue 3's must-show (bytes pushed per step within 2x of
rows touched x row bytes); this keeps it from rotting as the data plane changes. A 20,000-row table
and a handful of steps: seconds, not the minute of the real run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sparse.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_sparse", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_sparse_bench_pushes_rows_not_the_table_and_exits_zero(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "sparse.json"
    code = bench.main([
        "--table-rows", "20000", "--rows-per-step", "50,500", "--servers", "1,2",
        "--steps", "2", "--repeats", "1", "--warmup", "1", "--dense-steps", "1", "--json", str(out),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().out
    report = json.loads(out.read_text())
    row_bytes = report["environment"]["row_bytes"]
    assert row_bytes == 64
    for config in report["configurations"]:
        rows = config["rows_touched"]
        # the server counts each row's values and its int64 index, nothing else
        assert config["server_pushed_median"] == rows * (row_bytes + 8)
        assert rows * row_bytes < config["wire_pushed_max"] <= 2 * rows * row_bytes
    assert report["worst_ratio"] <= 2.0
    assert report["whole_table_dense"]["wire_pushed_median"] > 20_000 * row_bytes
