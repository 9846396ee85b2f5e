"""Elastic worker count of a running ``lepton up``: the plan, and the two files that carry a request.

While it runs, ``lepton up`` keeps ``STATE_DIR/up.json`` (its pid, the coordinator's address, the
current and maximum worker count, and the last request it acknowledged) and takes
``STATE_DIR/scale.json`` every poll. ``lepton scale`` writes that request under a fresh id (hard link
of a finished temp file: atomic, and a second request cannot overwrite a pending one) and waits for
the id to appear in ``up.json``. The launcher takes a request by renaming it, so exactly one of the
launcher and a timed-out client (withdrawing it) gets it. Plain JSON files: no sockets, no pickle.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lepton.clock import Clock, MonotonicClock
from lepton.errors import ConfigError, DeadlineExceeded

UP_FILE = "up.json"
REQUEST_FILE = "scale.json"
DEFAULT_MAX_WORKERS = 8  # --max-workers when not given: max(--workers, this)
WORKER_PREFIX = "worker-"


def default_max_workers(workers: int) -> int:
    return max(workers, DEFAULT_MAX_WORKERS)


def worker_name(index: int) -> str:
    return f"{WORKER_PREFIX}{index}"


def worker_index(name: str) -> int:
    return int(name.removeprefix(WORKER_PREFIX))


def check_target(workers: int, max_workers: int) -> None:
    """Raises ConfigError unless 1 <= ``workers`` <= ``max_workers``."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    if workers > max_workers:
        raise ConfigError(f"--workers {workers} exceeds --max-workers {max_workers} of the running lepton up")


@dataclass(frozen=True)
class ScalePlan:
    """Workers to start (fresh names) and to stop (newest first) to reach a target count."""

    start: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()


def plan_scale(active: Sequence[str], next_index: int, target: int, max_workers: int) -> ScalePlan:
    """Decides which workers reach ``target``: new ones take indices from ``next_index`` on (a name is
    never reused, so logs and ready files stay one per process); the newest active ones are stopped,
    since the oldest have the warmest caches and the lowest names.

    Args:
        active: names of the workers the launcher keeps running (crashed ones awaiting restart too).
        next_index: the lowest index no worker of this launcher ever had.
        target: the worker count wanted.
        max_workers: the cap.

    Raises:
        ConfigError: ``target`` is below 1 or above ``max_workers``.
    """
    check_target(target, max_workers)
    if target >= len(active):
        return ScalePlan(start=tuple(worker_name(next_index + i) for i in range(target - len(active))))
    newest_first = sorted(active, key=worker_index, reverse=True)
    return ScalePlan(stop=tuple(newest_first[: len(active) - target]))


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


class ScaleControl:
    """The launcher's side: publishes ``up.json`` and takes requests from ``scale.json``.

    Owns both files: removes leftovers of an earlier launcher on creation and both files on ``close``.
    """

    def __init__(self, state_dir: Path, coordinator: str, workers: int, max_workers: int) -> None:
        self.up_path = Path(state_dir) / UP_FILE
        self.request_path = Path(state_dir) / REQUEST_FILE
        self._facts = {"pid": os.getpid(), "coordinator": coordinator, "workers": workers,
                       "max_workers": max_workers, "acknowledged": None}
        self.request_path.unlink(missing_ok=True)
        write_json_atomic(self.up_path, self._facts)

    def take_request(self) -> dict | None:
        """The pending request ({"id": str, "workers": int}), removed from the slot; None if there is
        none. A malformed one is returned with ``workers`` None, to be refused."""
        taken = self.request_path.with_name(f".{REQUEST_FILE}.taken")
        try:
            os.rename(self.request_path, taken)
        except FileNotFoundError:
            return None
        request = read_json(taken) or {}
        taken.unlink(missing_ok=True)
        workers = request.get("workers")
        return {"id": str(request.get("id", "")), "workers": workers if type(workers) is int else None}

    def acknowledge(self, request_id: str, before: int, after: int, error: str | None = None) -> None:
        """Records the outcome of a request; ``after`` becomes the published worker count."""
        self._facts["workers"] = after
        self._facts["acknowledged"] = {"id": request_id, "from": before, "to": after, "error": error}
        write_json_atomic(self.up_path, self._facts)

    def close(self) -> None:
        self.up_path.unlink(missing_ok=True)
        self.request_path.unlink(missing_ok=True)


def find_up(state_dir: Path) -> dict:
    """The facts of the ``lepton up`` running on ``state_dir``.

    Raises:
        ConfigError: there is no ``up.json``, or the process that wrote it is gone.
    """
    facts = read_json(Path(state_dir) / UP_FILE)
    if facts is None:
        raise ConfigError(
            f"no running lepton up at {state_dir} (no {UP_FILE}; is --state-dir right, is it still starting?)"
        )
    pid = facts.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        raise ConfigError(f"no running lepton up at {state_dir}: {UP_FILE} is stale (pid {pid} is not running)")
    return facts


def request_scale(
    state_dir: Path,
    workers: int,
    timeout_s: float,
    clock: Clock = MonotonicClock(),
    sleep: Callable[[float], None] = time.sleep,
    poll_s: float = 0.1,
) -> tuple[int, int]:
    """Asks the ``lepton up`` on ``state_dir`` for ``workers`` workers and waits for its answer.

    Returns:
        (workers before, workers after), as the launcher acknowledged them.

    Raises:
        ConfigError: no running ``lepton up`` there, the count is out of range, or the launcher refused.
        DeadlineExceeded: no acknowledgement within ``timeout_s`` (the request is withdrawn if the
            launcher had not taken it yet).
    """
    state_dir = Path(state_dir)
    facts = find_up(state_dir)
    check_target(workers, int(facts["max_workers"]))
    request_id = uuid.uuid4().hex
    request_path = state_dir / REQUEST_FILE
    deadline = clock.now() + timeout_s
    tmp = state_dir / f".{REQUEST_FILE}.{request_id}.tmp"
    tmp.write_text(json.dumps({"id": request_id, "workers": workers}))
    try:
        while True:  # the slot holds one request; wait for an earlier one to be taken
            try:
                os.link(tmp, request_path)
                break
            except FileExistsError:
                pass
            if clock.now() > deadline:
                raise DeadlineExceeded(f"another scale request at {request_path} was not taken within {timeout_s:.0f}s")
            find_up(state_dir)
            sleep(poll_s)
    finally:
        tmp.unlink(missing_ok=True)
    while True:
        current = read_json(state_dir / UP_FILE)
        ack = (current or {}).get("acknowledged") or {}
        if ack.get("id") == request_id:
            if ack.get("error"):
                raise ConfigError(f"lepton up refused: {ack['error']}")
            return int(ack["from"]), int(ack["to"])
        if current is None or not pid_alive(int(current.get("pid", facts["pid"]))):
            raise ConfigError(f"lepton up at {state_dir} ended before it acknowledged the request")
        if clock.now() > deadline:
            raise DeadlineExceeded(_withdraw(request_path, request_id, timeout_s))
        sleep(poll_s)


def _withdraw(request_path: Path, request_id: str, timeout_s: float) -> str:
    withdrawn = request_path.with_name(f".{REQUEST_FILE}.{request_id}.withdrawn")
    try:
        os.rename(request_path, withdrawn)
    except FileNotFoundError:
        return f"lepton up took the request but did not acknowledge it within {timeout_s:.0f}s; it may still apply it"
    mine = (read_json(withdrawn) or {}).get("id") == request_id
    if mine:
        withdrawn.unlink(missing_ok=True)
        return f"lepton up did not take the request within {timeout_s:.0f}s; request withdrawn"
    try:  # someone else's request, sent after the launcher took ours: put it back
        os.link(withdrawn, request_path)
    except FileExistsError:
        pass
    withdrawn.unlink(missing_ok=True)
    return f"lepton up took the request but did not acknowledge it within {timeout_s:.0f}s; it may still apply it"
