"""Test helpers: waiting on conditions with deadlines, and real processes that are always reaped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
CHAOS_TABLE: list[dict] = []  # rows of the chaos matrix, printed at the end of the session
TAG_VAR = "LEPTON_TEST_TAG"


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Polls ``predicate`` until it returns something truthy; fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def lepton_argv(*args: str) -> list[str]:
    """``lepton ...`` through the console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("lepton")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "lepton", *args]


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries ``LEPTON_TEST_TAG=tag`` (children inherit it)."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Processes:
    """Starts real processes with a common tag; ``close`` kills and reaps every one of them, and
    any descendant still carrying the tag, even when the test failed."""

    def __init__(self, log_dir: Path) -> None:
        self.tag = uuid.uuid4().hex
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []
        self.extra_env: dict[str, str] = {}

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env, TAG_VAR: self.tag, "PYTHONUNBUFFERED": "1"}

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=cwd
        )
        log.close()
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in tagged_pids(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def frozen_lease_holder(status: Callable[[], object | None], pick: Callable[[object], object | None]):
    """A worker stopped (SIGSTOP) while it holds a lease, or None for now.

    ``pick(status)`` chooses a lease holder from one status answer; the worker is stopped and a
    second answer must still show it alive with a lease. A shard can finish between the two looks
    (digits shards take milliseconds), and a stopped worker cannot finish it afterwards, so what the
    caller does next (SIGKILL, a long pause) happens to a worker that really holds work. A worker
    that no longer holds one is continued (SIGCONT) and None is returned.
    """
    first = status()
    victim = pick(first) if first is not None else None
    if victim is None:
        return None
    os.kill(victim.pid, signal.SIGSTOP)
    second = status()
    if second is not None and any(
        m.member.member_id == victim.member.member_id and m.member.incarnation == victim.member.incarnation
        and m.alive and m.has_lease
        for m in second.members
    ):
        return victim
    os.kill(victim.pid, signal.SIGCONT)
    return None


def job_events(client, after: int = 0) -> list:
    """The coordinator's retained events after sequence ``after`` (WatchJob read for 1 s: the
    stream stays open for new events, so its deadline ends it once everything retained was read)."""
    from lepton.v1 import coordinator_pb2 as cpb

    stream = client._stub.WatchJob(cpb.WatchJobRequest(after_sequence=after), timeout=1.0)
    events = []
    try:
        for event in stream:
            events.append(event)
    except Exception:  # noqa: BLE001 - the deadline ends the stream
        pass
    return events


def serve_share(member_id, specs, initial, optimizer: str, lr: float, kwargs, workers: int, step_timeout_s: float):
    """A sync parameter server on 127.0.0.1:0 holding ``specs`` (its share of a layout, with their
    sparse flags and kinds) cut from the whole tensors ``initial``, with worker identities
    w-0..w-(workers-1) live. Returns (node, started server); the caller stops the server."""
    from lepton.rpc import Server
    from lepton.tensors import part
    from ps_server.parameter_server import ParameterServer
    from ps_server.roster import WorkerEntry
    from ps_server.servicer import ParameterServerServicer, registration

    node = ParameterServer(member_id)
    node.load(
        {t.name: part(initial, t) for t in specs}, optimizer, lr, kwargs, "sync", step_timeout_s=step_timeout_s,
        sparse=[t.name for t in specs if t.sparse], kinds={t.name: t.kind for t in specs},
    )
    node.update_roster([WorkerEntry(f"w-{i}", 1, True) for i in range(workers)])
    server = Server("127.0.0.1:0", [registration(ParameterServerServicer(node))], reflection_enabled=False)
    server.start()
    return node, server
