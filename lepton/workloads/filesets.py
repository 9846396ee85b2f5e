"""File-backed data sets: a directory of Parquet files (``parquet:DIR``) or of ``.npy`` arrays
(``npy:DIR``), read lazily. Opening one reads metadata only (row counts, schema, and for integer
labels the class count from Parquet's column statistics); samples are read when asked for, and a
worker asks only for the rows of the shard it holds (``window``).

Layout: ``DIR/train`` and ``DIR/test``, each holding ``*.parquet`` files (rows in file-name order,
then file order) or one ``COLUMN.npy`` array per column (rows along the first axis). Features are
the named columns (each a number, or a fixed-size list or array row of numbers), concatenated in
that order into float32 vectors; the label column holds integer class ids or real-valued targets.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lepton.errors import ConfigError
from lepton.workloads.workload import Workload

DEFAULT_LABEL_COLUMN = "label"
CACHED_ROW_GROUPS = 2  # sequential reads (evaluation) decode each Parquet row group once


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "dataset parquet:DIR needs pyarrow, which is not installed: pip install 'lepton[parquet]'"
        ) from None
    return pq


class Rows(Dataset):
    """Rows of a file-backed split, indexed from 0. ``take_rows`` reads a batch; ``window`` reads one
    contiguous range into memory and indexes it by the same (global) row numbers."""

    features: tuple[str, ...]
    label: str
    length: int
    input_dim: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.take_rows(torch.tensor([index]))
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.take_rows(torch.as_tensor(indices, dtype=torch.int64))

    def take_rows(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def window(self, start: int, end: int) -> Window:
        raise NotImplementedError


class Window(Dataset):
    """Rows ``[start, end)`` of a split, in memory, indexed by their global row numbers."""

    def __init__(self, start: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.start, self.x, self.y = start, x, y

    def __len__(self) -> int:
        return len(self.y)

    def take_rows(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = indices - self.start
        return self.x[local], self.y[local]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.take_rows(torch.as_tensor(indices, dtype=torch.int64))


def _tensor(values: np.ndarray, dtype: type) -> torch.Tensor:
    """A tensor of its own (writable, contiguous) memory; copies only what is not already so."""
    return torch.from_numpy(np.require(values.astype(dtype, copy=False), requirements=["C", "W"]))


def _as_matrix(parts: list[np.ndarray], rows: int) -> torch.Tensor:
    flat = [p.reshape(rows, -1) for p in parts]
    return _tensor(flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1), np.float32)


def _as_labels(values: np.ndarray) -> torch.Tensor:
    if values.dtype.kind in "iub":
        return _tensor(values, np.int64)
    if values.dtype.kind == "f":
        return _tensor(values, np.float32)
    raise ConfigError(f"label column holds {values.dtype}, not integer class ids or real-valued targets")


class ParquetRows(Rows):
    """A split stored as Parquet files, read by row group (``CACHED_ROW_GROUPS`` decoded ones kept)."""

    def __init__(self, directory: Path, features: tuple[str, ...], label: str) -> None:
        pq = _pyarrow()
        self.paths = sorted(directory.glob("*.parquet"))
        if not self.paths:
            raise ConfigError(f"no *.parquet files in {directory}")
        schema = pq.read_schema(self.paths[0])
        names = list(schema.names)
        if label not in names:
            raise ConfigError(f"{self.paths[0]} has no label column {label!r} (columns: {names})")
        self.label = label
        self.features = features or tuple(n for n in names if n != label)
        missing = [n for n in self.features if n not in names]
        if missing or not self.features:
            raise ConfigError(f"{self.paths[0]} has no feature columns {missing or '(none left)'} (columns: {names})")
        self.groups: list[tuple[int, int]] = []  # (file, row group) in row order
        self.starts: list[int] = []  # the first row of each group
        self.length = 0
        self.label_max: int | None = -1  # from column statistics; None: some group has none
        for f, path in enumerate(self.paths):
            meta = pq.ParquetFile(path).metadata
            column = meta.schema.names.index(label) if label in meta.schema.names else -1
            if column < 0:
                raise ConfigError(f"{path} has no label column {label!r}")
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                if group.num_rows == 0:
                    continue
                self.groups.append((f, g))
                self.starts.append(self.length)
                self.length += group.num_rows
                stats = group.column(column).statistics
                if (
                    self.label_max is not None
                    and stats is not None
                    and stats.has_min_max
                    and isinstance(stats.max, int)
                ):
                    self.label_max = max(self.label_max, stats.max)
                else:
                    self.label_max = None
        self._files: dict[int, Any] = {}
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        x, _ = self._group(0) if self.groups else (torch.zeros(0, 0), None)
        self.input_dim = int(x.shape[1]) if x.dim() == 2 else 0

    def __getstate__(self) -> dict:  # a DataLoader worker opens its own files
        return {**self.__dict__, "_files": {}, "_cache": OrderedDict()}

    def _decode(self, table: Any) -> tuple[torch.Tensor, torch.Tensor]:
        rows = table.num_rows
        parts = []
        for name in self.features:
            column = table.column(name).combine_chunks()
            parts.append(_flat_numbers(column, name, rows))
        return _as_matrix(parts, rows), _as_labels(table.column(self.label).to_numpy())

    def _group(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        f, g = self.groups[i]
        if f not in self._files:
            self._files[f] = _pyarrow().ParquetFile(self.paths[f])  # read, not mapped: mapped pages would count
        decoded = self._decode(self._files[f].read_row_group(g, columns=[*self.features, self.label]))
        self._cache[i] = decoded
        while len(self._cache) > CACHED_ROW_GROUPS:
            self._cache.popitem(last=False)
        return decoded

    def take_rows(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = indices.numpy()
        if len(rows) and not (0 <= rows.min() and rows.max() < self.length):
            raise IndexError(f"rows outside [0, {self.length})")
        starts = np.asarray(self.starts)
        group_of = np.searchsorted(starts, rows, side="right") - 1
        x_out: torch.Tensor | None = None
        y_out: torch.Tensor | None = None
        for g in dict.fromkeys(group_of.tolist()):  # each group once, in first-use order
            x, y = self._group(g)
            mask = torch.from_numpy(group_of == g)
            if x_out is None or y_out is None:
                x_out = x.new_empty((len(rows), *x.shape[1:]))
                y_out = y.new_empty((len(rows), *y.shape[1:]))
            local = torch.from_numpy(rows[group_of == g] - starts[g])
            x_out[mask], y_out[mask] = x[local], y[local]
        if x_out is None or y_out is None:
            return torch.zeros(0, self.input_dim), torch.zeros(0, dtype=torch.int64)
        return x_out, y_out

    def window(self, start: int, end: int) -> Window:
        """Reads only the row groups that hold rows ``[start, end)``, and keeps only those rows."""
        first = max(bisect.bisect_right(self.starts, start) - 1, 0)
        x_out = y_out = None
        i = first
        while i < len(self.groups) and self.starts[i] < end:
            x, y = self._group(i)
            if x_out is None or y_out is None:  # filled group by group: no second copy of the rows
                x_out = x.new_empty((end - start, *x.shape[1:]))
                y_out = y.new_empty((end - start, *y.shape[1:]))
            lo, hi = max(start - self.starts[i], 0), min(end - self.starts[i], len(y))
            at = self.starts[i] + lo - start
            x_out[at:at + hi - lo], y_out[at:at + hi - lo] = x[lo:hi], y[lo:hi]
            i += 1
        self._cache.clear()
        if x_out is None or y_out is None:
            raise IndexError(f"rows [{start}, {end}) are outside [0, {self.length})")
        return Window(start, x_out, y_out)


def _flat_numbers(column: Any, name: str, rows: int) -> np.ndarray:
    """A column of numbers or of fixed-size lists of numbers, as a ``rows x width`` array."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        values = column.flatten().to_numpy()
        if rows and len(values) % rows:
            raise ConfigError(f"feature column {name!r} holds lists of different lengths")
        return values.reshape(rows, -1)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return column.to_numpy(zero_copy_only=False).reshape(rows, 1)
    raise ConfigError(f"feature column {name!r} is {kind}, not numbers or lists of numbers")


class NpyRows(Rows):
    """A split stored as one ``.npy`` array per column, memory-mapped: a read touches only the rows
    it asks for, and the mapping is dropped after each read so untouched pages never count."""

    def __init__(self, directory: Path, features: tuple[str, ...], label: str) -> None:
        found = sorted(p.stem for p in directory.glob("*.npy"))
        if label not in found:
            raise ConfigError(f"no {label}.npy in {directory} (arrays: {found})")
        self.directory, self.label = directory, label
        self.features = features or tuple(n for n in found if n != label)
        missing = [n for n in self.features if n not in found]
        if missing or not self.features:
            raise ConfigError(f"no feature arrays {missing or '(none left)'} in {directory} (arrays: {found})")
        lengths = {n: len(self._map(n)) for n in (*self.features, label)}
        if len(set(lengths.values())) != 1:
            raise ConfigError(f"the arrays in {directory} have different row counts: {lengths}")
        self.length = lengths[label]
        self.input_dim = sum(int(np.prod(self._map(n).shape[1:], dtype=np.int64)) for n in self.features)
        self.label_max = None  # read from the label array when needed (_class_count)

    def _map(self, name: str) -> np.ndarray:
        return np.load(os.path.join(self.directory, f"{name}.npy"), mmap_mode="r")

    def _read(self, rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [np.asarray(self._map(n)[rows]) for n in self.features]
        count = len(parts[0])
        return _as_matrix(parts, count), _as_labels(np.asarray(self._map(self.label)[rows]))

    def take_rows(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(indices) and not (0 <= int(indices.min()) and int(indices.max()) < self.length):
            raise IndexError(f"rows outside [0, {self.length})")
        return self._read(indices.numpy())

    def window(self, start: int, end: int) -> Window:
        return Window(start, *self._read(slice(start, end)))


def _class_count(rows: Rows) -> int:
    """Integer labels: the largest id + 1, from Parquet's statistics when every row group has
    them, else by reading the label column alone (never the features)."""
    label_max = getattr(rows, "label_max", None)
    if label_max is not None:
        return int(label_max) + 1
    if isinstance(rows, NpyRows):
        return int(rows._map(rows.label).max()) + 1 if rows.length else 0
    assert isinstance(rows, ParquetRows)
    pq = _pyarrow()
    top = -1
    for path in rows.paths:
        column = pq.read_table(path, columns=[rows.label]).column(0)
        if len(column):
            top = max(top, int(np.max(column.to_numpy())))
    return top + 1


def load_files(spec: str, features: tuple[str, ...] = (), label: str = DEFAULT_LABEL_COLUMN) -> Workload:
    """The workload of ``parquet:DIR`` or ``npy:DIR`` (metadata only; see the module's docstring)."""
    kind, _, where = spec.partition(":")
    root = Path(where).expanduser()
    splits = {}
    for split in ("train", "test"):
        directory = root / split
        if not directory.is_dir():
            raise ConfigError(f"dataset {spec!r}: no directory {directory} (a {kind} data set has train/ and test/)")
        rows: Rows = (ParquetRows if kind == "parquet" else NpyRows)(
            directory, tuple(features), label or DEFAULT_LABEL_COLUMN
        )
        splits[split] = rows
    train = splits["train"]
    if len(train) == 0:
        raise ConfigError(f"dataset {spec!r} has no training samples")
    y0 = train.take_rows(torch.arange(1))[1]
    if y0.is_floating_point():
        return Workload(train, splits["test"], train.input_dim, 0, target_dim=int(y0[0].numel()))
    return Workload(train, splits["test"], train.input_dim, max(_class_count(train), _class_count(splits["test"])))

