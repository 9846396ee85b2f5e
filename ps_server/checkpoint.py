"""Atomic on-disk checkpoints of one parameter server's slice of the model.

Each checkpoint is one file ``ckpt-<version>.pt`` (torch.save of tensors and the optimizer state;
loaded with ``weights_only=True``, so loading runs no pickled code) written as temporary file,
fsync, rename, fsync of the directory: a crash leaves either the old or the new checkpoint, never
a torn one. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


class CheckpointDirectory:
    """Saves and finds checkpoints of one server under ``directory``."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = max(1, keep)

    def save(self, version: int, state: dict[str, Any]) -> Path:
        final = self.directory / f"ckpt-{version:012d}.pt"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in self.versions()[: -self.keep]:
            (self.directory / f"ckpt-{old:012d}.pt").unlink(missing_ok=True)
        return final

    def versions(self) -> list[int]:
        found = []
        for entry in self.directory.iterdir():
            m = _NAME.match(entry.name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> tuple[int, dict[str, Any]] | None:
        """The newest readable checkpoint (a damaged newest one falls back to the one before)."""
        for version in reversed(self.versions()):
            try:
                return version, torch.load(self.directory / f"ckpt-{version:012d}.pt", weights_only=True)
            except Exception:  # noqa: BLE001 - a torn or foreign file: try the previous one
                continue
        return None
