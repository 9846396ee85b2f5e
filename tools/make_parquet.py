"""Writes a learnable classification data set as Parquet (or .npy) files for ``--dataset parquet:DIR``
(``npy:DIR``): DIR/train and DIR/test, a ``features`` column of fixed-size float32 lists and an
int64 ``label`` column. Samples are class centres in a small latent space, projected to
``--features`` values, plus noise (the same recipe shape as synthetic-image). Needs pyarrow
(``pip install 'lepton[parquet]'``) for Parquet.

    python tools/make_parquet.py /tmp/big --megabytes 1100
    python tools/make_parquet.py /tmp/small --rows 20000 --format npy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

CHUNK_ROWS = 4096  # rows generated at a time, and (default) per Parquet row group: decoding one
# takes several times its size (list values come with repetition and definition levels)


def _chunk(rng: np.random.Generator, rows: int, centres: np.ndarray, projection: np.ndarray, noise: float):
    labels = rng.integers(0, len(centres), size=rows)
    latent = centres[labels] + rng.standard_normal((rows, centres.shape[1]))
    x = latent @ projection + noise * rng.standard_normal((rows, projection.shape[1]))
    return x.astype(np.float32), labels.astype(np.int64)


def write(out: Path, train_rows: int, test_rows: int, features: int, classes: int, fmt: str,
          files: int, seed: int, chunk_rows: int = CHUNK_ROWS) -> int:
    """Writes the data set; returns its size on disk in bytes."""
    rng = np.random.default_rng(seed)
    latent = 16
    centres = 2.0 * rng.standard_normal((classes, latent))
    projection = rng.standard_normal((latent, features)) / np.sqrt(latent)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        directory = out / split
        directory.mkdir(parents=True, exist_ok=False)
        if fmt == "npy":
            x = np.lib.format.open_memmap(
                directory / "features.npy", mode="w+", dtype=np.float32, shape=(rows, features)
            )
            y = np.lib.format.open_memmap(directory / "label.npy", mode="w+", dtype=np.int64, shape=(rows,))
            for lo in range(0, rows, chunk_rows):
                hi = min(rows, lo + chunk_rows)
                x[lo:hi], y[lo:hi] = _chunk(rng, hi - lo, centres, projection, 1.0)
            x.flush(), y.flush()
            del x, y
            continue
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("features", pa.list_(pa.float32(), features)), ("label", pa.int64())])
        per_file = -(-rows // files)
        for f in range(files):
            lo_file, hi_file = f * per_file, min(rows, (f + 1) * per_file)
            if lo_file >= hi_file:
                break
            with pq.ParquetWriter(directory / f"part-{f:04d}.parquet", schema, compression="none") as writer:
                for lo in range(lo_file, hi_file, chunk_rows):
                    x, y = _chunk(rng, min(hi_file, lo + chunk_rows) - lo, centres, projection, 1.0)
                    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), features)
                    writer.write_table(
                        pa.table({"features": column, "label": y}, schema=schema), row_group_size=chunk_rows
                    )
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="directory to create (must not exist)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rows", type=int, help="training rows")
    size.add_argument("--megabytes", type=float, help="about this many MB of training data instead")
    p.add_argument("--test-fraction", type=float, default=0.1, help="test rows per training row")
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--files", type=int, default=4, help="Parquet files per split")
    p.add_argument("--format", choices=["parquet", "npy"], default="parquet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row-group-rows", type=int, default=CHUNK_ROWS, help="rows per Parquet row group")
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"{args.out} exists; choose a new directory", file=sys.stderr)
        return 2
    row_bytes = 4 * args.features + 8
    rows = args.rows if args.rows else int((args.megabytes or 100) * 1e6 / row_bytes)
    size = write(args.out, rows, max(1, int(rows * args.test_fraction)), args.features, args.classes,
                 args.format, args.files, args.seed, args.row_group_rows)
    print(f"wrote {args.out}: {rows} training rows, {size / 1e6:.1f} MB on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
