"""Periodic checkpoints written off the request path.

Every ``every_steps`` updates the gate's ``after_apply`` hook copies the store's state (parameters,
optimizer state, schedule, version) into staging buffers that are reused from one checkpoint to
the next, under the gate's lock, and hands them to one writer thread, which writes the file
atomically (``CheckpointDirectory.save``: temporary file, fsync, rename) while pushes go on.

At most one write is in flight. An interval that comes while one is still being written is
coalesced, not queued and not dropped: once that write ends, the writer copies the state as it is
then (taking the gate's lock for the copy) and writes it, so a slow disk thins checkpoints out but
the newest one on disk is never more than one write behind. The staging buffers are copied into
only while no write is in flight, so one set suffices.

``close`` flushes: it waits (bounded) for the write in flight and a coalesced one, so a server
stopped by SIGTERM leaves the newest checkpoint it began. A write cut short (SIGKILL, a flush past
its bound) leaves only a temporary file, which ``CheckpointDirectory`` ignores and removes.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
import torch

from ps_server.checkpoint_files import CheckpointDirectory
from ps_server.store import ParameterStore

log = structlog.get_logger("lepton.ps")
T = TypeVar("T")
# Runs a function on the store under the gate's lock (ConsistencyGate.under_lock).
Locked = Callable[[Callable[[ParameterStore], T]], T]

FLUSH_TIMEOUT_S = 30.0


@dataclass
class CheckpointTally:
    """A server's periodic checkpoints over its life (across reloads of its assignment)."""

    version: int = -1  # the newest version saved
    failed: int = 0  # writes that failed (disk full, ...)
    coalesced: int = 0  # intervals that came while a write was in flight (written later as one)


def copy_into(value: Any, staging: Any) -> Any:
    """A copy of ``value`` (nested dicts, lists and tuples of tensors and plain values) that reuses
    the tensors of ``staging`` (an earlier result) where shape, dtype and layout match."""
    if isinstance(value, torch.Tensor):
        if (
            isinstance(staging, torch.Tensor) and staging.shape == value.shape and staging.dtype == value.dtype
            and value.layout == torch.strided and staging.layout == torch.strided
        ):
            with torch.no_grad():
                return staging.copy_(value)
        return value.detach().clone()
    if isinstance(value, dict):
        known = staging if isinstance(staging, dict) else {}
        return {k: copy_into(v, known.get(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        same = isinstance(staging, list | tuple) and len(staging) == len(value)
        items = [copy_into(v, staging[i] if same else None) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    return copy.deepcopy(value)


class PeriodicCheckpoints:
    """Saves the store every ``every_steps`` updates on a writer thread of its own. Called as the
    gate's ``after_apply`` hook (under the gate's lock); ``attach`` gives it the gate's
    ``under_lock``, for a coalesced interval's copy. Thread-safe."""

    def __init__(self, directory: CheckpointDirectory, every_steps: int, tally: CheckpointTally) -> None:
        self.directory = directory
        self.every_steps = every_steps
        self.tally = tally
        self._locked: Locked | None = None
        self._cond = threading.Condition()
        self._staging: dict[str, Any] | None = None  # owned by the writer while _busy
        self._job: dict[str, Any] | None = None  # staged, waiting for the writer
        self._busy = False  # a copy staged or being written
        self._coalesced = False  # an interval came while busy
        self._closed = False
        self._failing = False
        self._thread: threading.Thread | None = None

    def attach(self, locked: Locked) -> None:
        self._locked = locked

    def __call__(self, store: ParameterStore) -> None:
        if store.version % self.every_steps != 0:
            return
        with self._cond:
            if self._closed:
                return
            if self._busy:
                self._coalesced = True
                self.tally.coalesced += 1
                return
            self._busy = True
        self._stage(store)  # under the gate's lock (the caller's); the writer is idle

    def _stage(self, store: ParameterStore) -> None:
        self._staging = copy_into(store.state_dict(copy=False), self._staging)
        with self._cond:
            self._job = self._staging
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    self._cond.wait()
                job, self._job = self._job, None
                if job is None:
                    return  # closed with nothing staged
            self._write(job)
            with self._cond:
                again = self._coalesced and self._locked is not None
                self._coalesced = False
                if not again:
                    self._busy = False
                    self._cond.notify_all()
            if again:
                assert self._locked is not None
                self._locked(self._stage)

    def _write(self, state: dict[str, Any]) -> None:
        version = int(state["version"])
        try:
            self.directory.save(version, state)
        except Exception as exc:  # noqa: BLE001 - the writer must outlive any failed write
            # Disk full, file too large, directory gone (torch's zip writer reports a failed write
            # as RuntimeError): the updates are applied and training goes on; the next interval
            # tries again. One log line per failed write, never one per push.
            self.tally.failed += 1
            self._failing = True
            log.warning(
                "checkpoint_failed", version=version, failures=self.tally.failed,
                directory=str(self.directory.directory), error=str(exc) or type(exc).__name__,
            )
            return
        if self._failing:
            log.info("checkpoint_recovered", version=version, failures=self.tally.failed)
        self._failing = False
        self.tally.version = version

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Waits until no write is in flight or coalesced; returns whether that happened in time."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy, timeout=timeout_s)

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Takes no more intervals, finishes the write in flight and a coalesced one (up to
        ``timeout_s``) and ends the writer; returns whether everything was written in time. Not
        to be called under the gate's lock (a coalesced copy takes it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        flushed = self.flush(timeout_s)
        if not flushed:
            log.warning("checkpoint_flush_timed_out", timeout_s=timeout_s, directory=str(self.directory.directory))
        return flushed
