"""The processes ``lepton up`` starts: spawning, restarting and stopping them, and their ready files.

Children get SIGTERM from the kernel if this process dies (PR_SET_PDEATHSIG), so none is orphaned.
Stopping is SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from lepton.errors import ConfigError, LeptonError
from lepton.ops.placement import Placements
from lepton.ops.scale import plan_scale, worker_index
from lepton.process import EXIT_CONFIG, EXIT_STATE_NOT_SAVED

log = structlog.get_logger("lepton.up")
STOP_GRACE_S = 10.0


def lepton_command() -> list[str]:
    """The ``lepton`` console script beside this interpreter, else ``python -m lepton``."""
    script = Path(sys.executable).with_name("lepton")
    if script.exists():
        return [str(script)]
    found = shutil.which("lepton")
    return [found] if found else [sys.executable, "-m", "lepton"]



def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)
    restarts: int = 0

    @property
    def failed(self) -> bool:
        code = self.process.poll()
        return code is not None and code != 0

    def exited(self) -> str:
        """The line "NAME exited with CODE", with what the code means when it names a cause to fix."""
        code = self.process.returncode
        said = f"{self.name} exited with {code}"
        if code == EXIT_STATE_NOT_SAVED and "--state-dir" in self.args[:-1]:
            where = self.args[self.args.index("--state-dir") + 1]
            said += f": it could not save its state in {where} (the file system is full or refuses writes)"
        return said


@dataclass
class Children:
    """Every process this launcher started; ``stop_all`` leaves none running."""

    log_dir: Path
    items: list[Child] = field(default_factory=list)
    placements: Placements = field(default_factory=Placements)
    env: dict[str, str] = field(default_factory=dict)  # added to each child's environment

    def _spawn(self, name: str, log_path: Path, args: list[str]) -> subprocess.Popen:
        out = open(log_path, "ab")
        try:
            return subprocess.Popen(
                [*self.placements(name).prefix, *lepton_command(), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env} if self.env else None,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            out.close()

    def start(self, name: str, args: list[str]) -> Child:
        log_path = self.log_dir / f"{name}.log"
        child = Child(name, self._spawn(name, log_path, args), log_path, list(args))
        self.items.append(child)
        log.debug("child_started", child=name, pid=child.process.pid)
        return child

    def restart(self, child: Child, args: list[str] | None = None) -> None:
        """Starts a crashed child again (compose's ``restart: on-failure``), same name and log."""
        said = child.exited()
        if args is not None:
            child.args = list(args)
        child.process = self._spawn(child.name, child.log_path, child.args)
        child.restarts += 1
        print(f"\n{said}; restarted (pid {child.process.pid})", flush=True)

    def stop(self, children: list[Child], grace_s: float = STOP_GRACE_S) -> None:
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("child_killed", child=child.name, pid=child.process.pid)
                child.process.kill()
                child.process.wait()

    def stop_all(self) -> None:
        # Workers first (they hand leases back), then servers, then the coordinator.
        order = sorted(self.items, key=lambda c: (c.name == "coordinator", c.name.startswith("ps")))
        self.stop([c for c in order if not c.name.startswith(("ps", "coordinator"))])
        self.stop([c for c in order if c.name.startswith("ps")])
        self.stop([c for c in order if c.name == "coordinator"])


@dataclass
class Workers:
    """The launcher's workers: the active ones it keeps at the target count (and restarts on
    failure), and the ones scaling down retired (SIGTERM: they hand their lease back and exit 0; never
    restarted, and SIGKILLed if still running ``STOP_GRACE_S`` later)."""

    children: Children
    worker_args: Callable[[str], list[str]]  # a worker's flags, by name
    next_index: int = 0
    retiring: dict[str, float] = field(default_factory=dict)  # name -> monotonic SIGKILL deadline
    retired: set[str] = field(default_factory=set)

    def active(self) -> list[Child]:
        return [c for c in self.children.items if c.name.startswith("worker") and c.name not in self.retired]

    def alive(self) -> int:
        return sum(1 for c in self.active() if c.process.poll() is None)

    def start(self, names: tuple[str, ...] | list[str]) -> None:
        for name in names:
            self.children.start(name, self.worker_args(name))
            self.next_index = max(self.next_index, worker_index(name) + 1)

    def scale(self, target: int, max_workers: int, now: float) -> tuple[list[str], list[str]]:
        """Starts or retires workers to reach ``target``; returns (started, stopped) names.

        Raises:
            ConfigError: ``target`` is out of range (nothing changed).
        """
        plan = plan_scale([c.name for c in self.active()], self.next_index, target, max_workers)
        self.start(plan.start)
        for child in self.active():
            if child.name in plan.stop:
                self.retired.add(child.name)
                self.retiring[child.name] = now + STOP_GRACE_S
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
        return list(plan.start), list(plan.stop)

    def reap(self, now: float) -> None:
        """SIGKILLs retired workers that outlived their grace period."""
        for name, deadline in list(self.retiring.items()):
            child = next(c for c in self.children.items if c.name == name)
            if child.process.poll() is not None:
                del self.retiring[name]
            elif now > deadline:
                log.warning("child_killed", child=name, pid=child.process.pid)
                child.process.kill()
                child.process.wait()
                del self.retiring[name]


def read_ready(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class ChildFailed(LeptonError):
    """A child exited before it was ready for a reason other than its configuration."""


def last_line(path: Path) -> str:
    """The last non-empty line of a child's log (its one-line reason when it refused to start)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def refusal(child: Child, ready_path: Path | None) -> ConfigError:
    """Why a child exited with EXIT_CONFIG: the reason it wrote to its ready file (see
    ``lepton.ops.cli.main``), else the last line of its log (argparse's message, for one)."""
    facts = read_ready(ready_path) if ready_path is not None else None
    if facts and facts.get("pid") == child.process.pid and facts.get("error"):
        return ConfigError(f"{child.name}: {facts['error']}")
    return ConfigError(
        f"{child.name}: {last_line(child.log_path) or 'refused its configuration'} (log: {child.log_path})"
    )


def wait_ready_file(path: Path, child: Child, timeout_s: float) -> dict:
    """The child's ready facts. Raises ConfigError (with its reason) if it refused its
    configuration, ChildFailed if it exited otherwise or was not ready in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        facts = read_ready(path)
        if facts is not None and facts.get("pid") == child.process.pid:
            if facts.get("error"):
                raise refusal(child, path)
            return facts
        if child.process.poll() is not None:
            if child.process.returncode == EXIT_CONFIG:
                raise refusal(child, path)
            raise ChildFailed(f"{child.exited()} before it was ready; see {child.log_path}")
        time.sleep(0.05)
    raise ChildFailed(f"{child.name} was not ready within {timeout_s:.0f}s; see {child.log_path}")
