"""Durable coordinator state behind a small interface, with SQLite as the first backend.

The job's control state is a handful of small JSON documents (job, members, ledger, format) and
keyed rows (one per member, one per shard: ``rows``), of which a commit rewrites only those that
changed, plus an append-only table of shard completions and the job's event history (the newest
EVENT_RETENTION events, committed with the change they describe).
WAL journaling with synchronous=NORMAL: a committed change survives the coordinator being
SIGKILLed (it is in the OS once committed); power loss may lose the last few commits.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from coordinator.events import EVENT_RETENTION
from lepton.errors import StateNotSaved
from lepton.files import write_atomically

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SavedCompletion:
    epoch: int
    shard: int
    member_id: str
    incarnation: int


@dataclass(frozen=True)
class SavedJob:
    documents: dict[str, dict]
    completions: list[SavedCompletion]
    events: list[dict] = field(default_factory=list)  # oldest first, at most EVENT_RETENTION
    rows: dict[str, dict[str, object]] = field(default_factory=dict)  # kind -> key -> JSON body


class JobStore(Protocol):
    """Where a coordinator keeps what must survive its own restart."""

    def load(self) -> SavedJob | None:
        """The saved job, or None for a fresh state directory."""
        ...

    def save(
        self,
        documents: dict[str, dict],
        new_completions: Iterable[SavedCompletion] = (),
        new_events: Iterable[dict] = (),
        rows: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        """Atomically replaces the given documents and rows (kind -> key -> JSON-ready body) and
        appends the completions and events (each event a JSON-ready dict with an increasing
        ``sequence``). Raises StateNotSaved when the change cannot be committed (disk full, I/O
        error); then nothing was written."""
        ...

    def write_manifest(self, checkpoint_id: str, document: dict) -> str:
        """Publishes a complete checkpoint's manifest where people and ``lepton export`` find it;
        returns its path."""
        ...

    def close(self) -> None: ...


@contextmanager
def _not_saved_on_disk_errors(path: Path) -> Iterator[None]:
    """SQLite's "database or disk is full", "disk I/O error", "unable to open database file" as
    StateNotSaved (UNAVAILABLE to callers: retryable), never as an unexplained internal error."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise StateNotSaved(f"the coordinator cannot write its state ({path}): {exc}; retry later") from exc


class SqliteJobStore:
    """JobStore in ``<state_dir>/coordinator.sqlite``."""

    def __init__(self, state_dir: str | Path) -> None:
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "coordinator.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS documents (name TEXT PRIMARY KEY, body TEXT NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS completions (epoch INTEGER NOT NULL, shard INTEGER NOT NULL,"
            " member_id TEXT NOT NULL, incarnation INTEGER NOT NULL, PRIMARY KEY (epoch, shard))"
        )
        # Added after schema 1 went out; a state directory without it simply has no history yet.
        self._db.execute("CREATE TABLE IF NOT EXISTS events (sequence INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        # Added with state format 3: members and shards as one row each, rewritten when they change.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS rows (kind TEXT NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL,"
            " PRIMARY KEY (kind, key))"
        )
        self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )

    def load(self) -> SavedJob | None:
        with self._lock, _not_saved_on_disk_errors(self.path):
            rows = self._db.execute("SELECT name, body FROM documents").fetchall()
            if not rows:
                return None
            completions = [
                SavedCompletion(*row)
                for row in self._db.execute(
                    "SELECT epoch, shard, member_id, incarnation FROM completions ORDER BY rowid"
                )
            ]
            events = [
                json.loads(body)
                for (body,) in self._db.execute(
                    "SELECT body FROM events ORDER BY sequence DESC LIMIT ?", (EVENT_RETENTION,)
                )
            ]
            keyed: dict[str, dict[str, object]] = {}
            for kind, key, body in self._db.execute("SELECT kind, key, body FROM rows"):
                keyed.setdefault(kind, {})[key] = json.loads(body)
        events.reverse()
        return SavedJob({name: json.loads(body) for name, body in rows}, completions, events, keyed)

    def save(
        self,
        documents: dict[str, dict],
        new_completions: Iterable[SavedCompletion] = (),
        new_events: Iterable[dict] = (),
        rows: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        events = [(e["sequence"], json.dumps(e)) for e in new_events]
        keyed = [(kind, key, json.dumps(body)) for kind, bodies in (rows or {}).items() for key, body in bodies.items()]
        with self._lock, _not_saved_on_disk_errors(self.path):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO documents (name, body) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET body = excluded.body",
                    [(name, json.dumps(body)) for name, body in documents.items()],
                )
                if keyed:
                    self._db.executemany(
                        "INSERT INTO rows (kind, key, body) VALUES (?, ?, ?) "
                        "ON CONFLICT(kind, key) DO UPDATE SET body = excluded.body",
                        keyed,
                    )
                # The primary key makes a double count impossible even if the caller slipped.
                self._db.executemany(
                    "INSERT INTO completions (epoch, shard, member_id, incarnation) VALUES (?, ?, ?, ?)",
                    [(c.epoch, c.shard, c.member_id, c.incarnation) for c in new_completions],
                )
                if events:
                    self._db.executemany("INSERT INTO events (sequence, body) VALUES (?, ?)", events)
                    self._db.execute("DELETE FROM events WHERE sequence <= ?", (events[-1][0] - EVENT_RETENTION,))
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself after some errors (a full disk at COMMIT); a second
                # ROLLBACK would fail with "no transaction is active" and hide the cause.
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise

    def write_manifest(self, checkpoint_id: str, document: dict) -> str:
        """``<state_dir>/checkpoints/<id>.json``, written as temporary file, fsync, rename, fsync
        of the directory (the SQLite job document stays the coordinator's own record)."""
        directory = self.path.parent / "checkpoints"
        directory.mkdir(exist_ok=True)
        final = directory / f"{checkpoint_id}.json"
        body = json.dumps({**document, "manifest_path": str(final)}, indent=2).encode()
        return str(write_atomically(final, lambda f: f.write(body)))

    def close(self) -> None:
        with self._lock:
            self._db.close()
