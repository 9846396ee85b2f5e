"""Atomic on-disk checkpoints of one parameter server's slice of the model.

Each checkpoint is one file ``ckpt-<version>.pt`` (torch.save of tensors and the optimizer state;
loaded with ``weights_only=True``, so loading runs no pickled code) written as temporary file,
fsync, rename, fsync of the directory: a crash leaves either the old or the new checkpoint, never
a torn one. The newest ``keep`` checkpoints are kept.

Checkpoints the coordinator orders (``lepton checkpoint``, and the final one when training ends)
go to ``snapshots/<checkpoint_id>.pt`` beside them, in the same format and written the same way;
they are kept (the coordinator's manifest names them) and never used for restarts. (The
coordinator's manifests of whole-job checkpoints are coordinator/checkpoints.py.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from lepton import files
from ps_server.store import ParameterStore

log = structlog.get_logger("lepton.ps")

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


@dataclass
class CheckpointTally:
    """A server's periodic checkpoints over its life (across reloads of its assignment)."""

    version: int = -1  # the newest version saved
    failed: int = 0  # intervals that could not be written (disk full, ...)


class PeriodicCheckpoints:
    """Saves the store every ``every_steps`` updates: the gate's ``after_apply`` hook (it runs
    under the gate's lock, so it needs no guard of its own)."""

    def __init__(self, directory: CheckpointDirectory, every_steps: int, tally: CheckpointTally) -> None:
        self.directory = directory
        self.every_steps = every_steps
        self.tally = tally
        self._failing = False

    def __call__(self, store: ParameterStore) -> None:
        if store.version % self.every_steps != 0:
            return
        try:
            self.directory.save(store.version, store.state_dict())
        except (OSError, RuntimeError) as exc:
            # Disk full, file too large, directory gone (torch's zip writer reports a failed write
            # as RuntimeError): the update is applied and the push it came with must succeed, so
            # training goes on; the next interval tries again. One log line per failed interval,
            # never one per push.
            self.tally.failed += 1
            self._failing = True
            log.warning(
                "checkpoint_failed", version=store.version, failures=self.tally.failed,
                directory=str(self.directory.directory), error=str(exc) or type(exc).__name__,
            )
            return
        if self._failing:
            log.info("checkpoint_recovered", version=store.version, failures=self.tally.failed)
        self._failing = False
        self.tally.version = store.version
