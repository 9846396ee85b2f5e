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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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


def serve_parameters(
    tensors,
    optimizer: str = "sgd",
    lr: float = 0.1,
    kwargs=None,
    mode: str = "sync",
    *,
    member_id: str = "ps-0",
    workers=(),
    step_timeout_s: float = 30.0,
    sparse=(),
    kinds=None,
    servicer=None,
    load_options=None,
    **server_options,
):
    """A parameter server on 127.0.0.1:0, loaded with ``tensors`` (its share of a layout, by
    name; ``sparse`` names the row-sparse ones, ``kinds`` their kinds) and with the worker
    identities ``workers`` (MemberIds) live on its roster. ``servicer(node)`` builds the servicer
    (default: the real one); ``load_options`` (lr_schedule, warmup_steps, ...) go to
    ``ParameterServer.load``, ``server_options`` to ``lepton.rpc.Server``. Returns (node,
    started server); the caller stops the server. The one helper every test and bench serves a
    parameter server with."""
    from lepton.rpc import Server
    from ps_server.parameter_server import ParameterServer
    from ps_server.roster import WorkerEntry
    from ps_server.servicer import ParameterServerServicer, registration

    node = ParameterServer(member_id)
    node.load(
        tensors, optimizer, lr, kwargs or {}, mode, step_timeout_s=step_timeout_s, sparse=list(sparse), kinds=kinds,
        **(load_options or {}),
    )
    node.update_roster([WorkerEntry(w.member_id, w.incarnation, True) for w in workers])
    build = servicer or ParameterServerServicer
    server = Server("127.0.0.1:0", [registration(build(node))], reflection_enabled=False, **server_options)
    server.start()
    return node, server


@dataclass
class ServedShard:
    """One server of ``serve_layout``: its node (to look inside), its gRPC server and the tensors
    (whole or row slices) the layout places on it."""

    member_id: str
    node: Any  # ps_server.parameter_server.ParameterServer
    server: Any  # lepton.rpc.Server
    specs: tuple


def layout_info(shards: list[ServedShard]):
    """The ``lepton.clients.LayoutInfo`` of served shards (version 1): what a worker's ServerSet reads."""
    from lepton.clients import LayoutInfo, ServerInfo

    return LayoutInfo(1, tuple(ServerInfo(s.member_id, s.server.address, s.specs) for s in shards))


def stop_shards(shards: list[ServedShard]) -> None:
    for shard in shards:
        shard.server.stop(0)


def serve_layout(
    initial, count: int, optimizer: str, lr: float, kwargs, workers: int, *,
    step_timeout_s: float, sparse=(), kinds=None, whole_tensors: bool = False, mode: str = "sync",
    skip_empty: bool = False, servicer=None, load_options=None,
) -> list[ServedShard]:
    """``count`` parameter servers (``serve_parameters``) holding the whole tensors ``initial`` as
    ``coordinator.layout.balance`` cuts them (row slices where a range boundary falls inside a
    tensor; whole tensors with ``whole_tensors``), worker identities w-0..w-(workers-1) live on
    each (``servicer`` as in ``serve_parameters``). With ``skip_empty``, servers the layout leaves
    without a tensor are not started. The caller stops them (``stop_shards``)."""
    from coordinator.layout import balance
    from lepton.domain import MemberId
    from lepton.tensors import TensorKind, TensorSpec, part

    kinds = kinds or {}
    specs = [
        TensorSpec(n, t.dtype, tuple(t.shape), sparse=n in sparse, kind=kinds.get(n, TensorKind.PARAMETER))
        for n, t in initial.items()
    ]
    layout = balance(specs, [f"ps-{i}" for i in range(count)], 1, whole_tensors=whole_tensors)
    served: list[ServedShard] = []
    try:
        for member_id in layout.servers:
            held = layout.tensors_of(member_id)
            if skip_empty and not held:
                continue
            node, server = serve_parameters(
                {t.name: part(initial, t) for t in held}, optimizer, lr, kwargs, mode, member_id=member_id,
                workers=[MemberId(f"w-{i}", 1) for i in range(workers)], step_timeout_s=step_timeout_s,
                sparse=[t.name for t in held if t.sparse], kinds={t.name: t.kind for t in held}, servicer=servicer,
                load_options=load_options,
            )
            served.append(ServedShard(member_id, node, server, held))
    except BaseException:
        stop_shards(served)
        raise
    return served
