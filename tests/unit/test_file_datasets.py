"""File-backed data sets (parquet:DIR, npy:DIR): lazy metadata, reads of only the asked-for rows,
and the worker's DataLoader batches, equal to reading the same indices from memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lepton.config import JobSpec
from lepton.errors import ConfigError
from lepton.workloads import filesets, load_workload, take
from worker.trainer import LoaderOptions, ShardRange, Trainer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import make_parquet  # noqa: E402


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pyarrow")
    out = tmp_path_factory.mktemp("pq") / "data"
    make_parquet.write(out, train_rows=3000, test_rows=500, features=8, classes=5, fmt="parquet", files=2, seed=1)
    return out


@pytest.fixture(scope="module")
def npy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("npy") / "data"
    make_parquet.write(out, train_rows=3000, test_rows=500, features=8, classes=5, fmt="npy", files=1, seed=1)
    return out


def _in_memory(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.load(directory / split / "features.npy")
    return torch.from_numpy(x), torch.from_numpy(np.load(directory / split / "label.npy"))


def test_parquet_opens_from_metadata_and_one_row_group(parquet_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []
    original = filesets.ParquetRows._decode
    monkeypatch.setattr(
        filesets.ParquetRows, "_decode", lambda self, table: decoded.append(table.num_rows) or original(self, table)
    )
    w = load_workload(f"parquet:{parquet_dir}", 0)
    assert (len(w.train), len(w.test), w.input_dim, w.num_classes) == (3000, 500, 8, 5)
    assert w.label_dtype == torch.int64
    # one row group per split for the input width, one for the first label: never the whole set
    assert sum(decoded) <= 2 * make_parquet.CHUNK_ROWS and len(decoded) <= 3


def test_parquet_and_npy_rows_agree_with_the_same_data_in_memory(parquet_dir: Path, npy_dir: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((parquet_dir / "train").glob("*.parquet")))
    x_all = torch.from_numpy(table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, 8).copy())
    y_all = torch.from_numpy(table.column("label").to_numpy().copy())
    rows = torch.tensor([2999, 0, 1500, 1499, 7])
    for spec, (x_ref, y_ref) in (
        (f"parquet:{parquet_dir}", (x_all, y_all)),
        (f"npy:{npy_dir}", _in_memory(npy_dir, "train")),
    ):
        w = load_workload(spec, 0)
        x, y = take(w.train, rows)
        assert torch.equal(x, x_ref[rows]) and torch.equal(y, y_ref[rows])
        window = w.train.window(1000, 2600)
        assert len(window) == 1600
        x, y = take(window, torch.tensor([1000, 2599, 1500]))
        assert torch.equal(x, x_ref[[1000, 2599, 1500]]) and torch.equal(y, y_ref[[1000, 2599, 1500]])


def test_named_columns_and_refusals(npy_dir: Path, parquet_dir: Path) -> None:
    w = load_workload(f"npy:{npy_dir}", 0, ("features",), "label")
    assert w.input_dim == 8
    with pytest.raises(ConfigError, match="no feature arrays"):
        load_workload(f"npy:{npy_dir}", 0, ("pixels",), "label")
    with pytest.raises(ConfigError, match="label column 'target'"):
        load_workload(f"parquet:{parquet_dir}", 0, (), "target")
    with pytest.raises(ConfigError, match="train/ and test/"):
        load_workload(f"parquet:{parquet_dir / 'train'}", 0)


def test_missing_pyarrow_is_a_config_error(parquet_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'lepton\[parquet\]'"):
        load_workload(f"parquet:{parquet_dir}", 0)


@pytest.mark.parametrize("loader", [LoaderOptions(), LoaderOptions(workers=2, prefetch=1)])
def test_shard_batches_are_the_shard_order_from_the_offset(npy_dir: Path, loader: LoaderOptions) -> None:
    """The DataLoader's batches, over the shard's rows alone, are exactly the samples of the
    shard's fixed order from the lease offset, batch by batch (as sync equivalence needs)."""
    spec = JobSpec(dataset=f"npy:{npy_dir}", batch_size=64, shards_per_epoch=3)
    trainer = Trainer(spec, loader)
    x_all, y_all = _in_memory(npy_dir, "train")
    shard = ShardRange(epoch=1, shard=1, start=1000, end=2000, offset=130)
    order = trainer.order(shard)
    assert sorted(order.tolist()) == list(range(1000, 2000))
    batches = list(trainer.batches(shard))
    expected_ends = [*range(194, 1000, 64), 1000]
    assert [b.offset_after for b in batches] == expected_ends
    lo = 130
    for b in batches:
        assert torch.equal(b.indices, order[lo:b.offset_after])
        assert torch.equal(b.x, x_all[b.indices]) and torch.equal(b.y, y_all[b.indices])
        lo = b.offset_after
    assert list(trainer.batches(ShardRange(1, 1, 1000, 2000, offset=1000))) == []


def test_in_memory_batches_match_indexing_the_data_set() -> None:
    trainer = Trainer(JobSpec(dataset="digits", batch_size=50))
    shard = ShardRange(epoch=0, shard=2, start=300, end=500, offset=0)
    for b in trainer.batches(shard):
        x, y = take(trainer.workload.train, b.indices)
        assert torch.equal(b.x, x) and torch.equal(b.y, y)
        assert trainer.gradients(b)[0] == trainer.gradients(b.indices)[0]


RSS_PROBE = """
import resource, sys, torch
from lepton.workloads import load_workload
w = load_workload(sys.argv[1], 0)
n, shards = len(w.train), 8
float(w.train.window(0, 1).x.sum())  # pyarrow, its memory pool and one row group: not the data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for s in range(shards):
    window = w.train.window(s * n // shards, (s + 1) * n // shards)
    float(window.x.sum())
    del window
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_reading_every_shard_in_turn_holds_about_one_shard(tmp_path: Path) -> None:
    """Peak memory grows by about one shard's rows, not the data set's (ru_maxrss, in a fresh
    process so that nothing else this test session allocated counts)."""
    pytest.importorskip("pyarrow")
    out = tmp_path / "data"
    make_parquet.write(
        out, train_rows=80_000, test_rows=100, features=256, classes=5, fmt="parquet", files=2, seed=2, chunk_rows=2048
    )
    size_mb = sum(p.stat().st_size for p in out.rglob("*.parquet")) / 2**20
    grown = float(subprocess.run(
        [sys.executable, "-c", RSS_PROBE, f"parquet:{out}"], capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.strip())
    assert size_mb > 75
    assert grown < size_mb / 4, f"peak RSS grew {grown:.1f} MiB reading a {size_mb:.1f} MiB data set shard by shard"
