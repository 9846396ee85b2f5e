"""Atomic on-disk checkpoints of one parameter server's slice of the model.

Each checkpoint is one file ``ckpt-<version>.pt`` (torch.save of tensors and the optimizer state;
loaded with ``weights_only=True``, so loading runs no pickled code) written as temporary file,
fsync, rename, fsync of the directory: a crash leaves either the old or the new checkpoint, never
a torn one (a write cut short leaves only ``ckpt-<version>.pt.tmp``, removed when a server next loads
from the directory). The newest ``keep`` checkpoints are kept; ps_server/periodic_checkpoints.py writes
them every so many updates.

Checkpoints the coordinator orders (``lepton checkpoint``, and the final one when training ends)
go to ``snapshots/<checkpoint_id>.pt`` beside them, in the same format and written the same way;
they are kept (the coordinator's manifest names them) and never used for restarts. (The
coordinator's manifests of whole-job checkpoints are coordinator/checkpoints.py.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lepton import files

_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


def write_atomically(final: Path, state: dict[str, Any]) -> Path:
    """torch.save to a temporary file, fsync, rename over ``final``, fsync of the directory."""
    return files.write_atomically(final, lambda f: torch.save(state, f))


class CheckpointDirectory:
    """Saves and finds checkpoints of one server under ``directory``."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = max(1, keep)

    def remove_torn(self) -> None:
        """Removes what writes cut short (a kill) left: call it only while nothing writes here."""
        for torn in self.directory.glob("ckpt-*.pt.tmp"):
            torn.unlink(missing_ok=True)

    def save(self, version: int, state: dict[str, Any]) -> Path:
        final = write_atomically(self.directory / f"ckpt-{version:012d}.pt", state)
        for old in self.versions()[: -self.keep]:
            (self.directory / f"ckpt-{old:012d}.pt").unlink(missing_ok=True)
        return final

    def save_snapshot(self, checkpoint_id: str, state: dict[str, Any]) -> Path:
        """An ordered checkpoint, ``snapshots/<checkpoint_id>.pt``; returns its absolute path."""
        directory = self.directory / "snapshots"
        directory.mkdir(exist_ok=True)
        return write_atomically(directory.resolve() / f"{checkpoint_id}.pt", state)

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
