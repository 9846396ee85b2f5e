"""Composition-root helpers: turning SIGTERM/SIGINT into an Event, ready files, stoppable loops."""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from lepton.errors import Unavailable
from lepton.limits import DEFAULT_LIMITS, Limits
from lepton.security import INSECURE, Security

log = structlog.get_logger("lepton.process")

# Exit codes, as operators (Kubernetes restart policies) read them.
EXIT_OK = 0
EXIT_CONFIG = 2            # permanent: bad flags or job file
EXIT_JOB_FAILED = 3        # permanent: the job ended in FAILED
EXIT_LOST_CONTACT = 160  # retryable (128-255, above the signal range): a peer could not be reached in time
EXIT_STATE_NOT_SAVED = 161  # retryable: the coordinator's state directory refused commits too long (disk full)


def exit_code_for(exc: Exception) -> int:
    """A client command's exit code for a failed call: retryable if the peer was unreachable,
    permanent otherwise (refused: bad input, permission, state)."""
    return EXIT_LOST_CONTACT if isinstance(exc, Unavailable) else EXIT_CONFIG


def stop_event_on_signals() -> threading.Event:
    """An Event set by the first SIGTERM or SIGINT (a second SIGINT raises KeyboardInterrupt)."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def write_ready_file(path: str | None, **facts: object) -> None:
    """Atomically writes ``facts`` as JSON to ``path`` (a parent process waits for it)."""
    if not path:
        return
    target = Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps({**facts, "pid": os.getpid()}))
    os.replace(tmp, target)


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """The most resident memory this process (or its largest reaped child, ``RUSAGE_CHILDREN``)
    has held, in MiB, as the kernel counts it."""
    kib = resource.getrusage(who).ru_maxrss  # Linux: KiB; macOS: bytes
    return round(kib / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def record_peak_rss(path: str | None) -> None:
    """Adds ``peak_rss_mb`` (and ``children_peak_rss_mb``: its largest reaped child, e.g. a
    DataLoader worker) to the ready file as the process exits; nothing without one."""
    if not path:
        return
    try:
        facts = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        facts = {}
    try:
        write_ready_file(
            path,
            **{**facts, "peak_rss_mb": peak_rss_mb(), "children_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)},
        )
    except OSError as exc:
        log.warning("peak_rss_not_recorded", path=path, error=str(exc))


def run_every(interval_s: float, stop: threading.Event, fn: Callable[[], None], name: str) -> threading.Thread:
    """Runs ``fn`` every ``interval_s`` on a daemon thread until ``stop`` is set."""

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                fn()
            except Exception:  # keep ticking; the failure is logged
                log.exception("periodic_task_failed", task=name)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


SHM_ENV = "LEPTON_SHM"  # "0": no shared-memory data path (as --no-shm), inherited by `lepton up`'s children


def shared_memory_by_env() -> bool:
    return os.environ.get(SHM_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class ServiceOptions:
    """What every role's serve() shares: security, metrics endpoint, reflection switch, call limits."""

    security: Security = INSECURE
    metrics_port: int | None = None  # None: no metrics endpoint; 0: a free port
    metrics_host: str = "127.0.0.1"
    reflection: bool = True
    limits: Limits = DEFAULT_LIMITS  # per-class and per-peer call limits of a server (lepton.limits)
    shared_memory: bool = True  # ps, worker: the shared-memory data path with co-located peers

    def metrics(self, collector_factory: Callable[[], object] | None = None):
        """(registry, endpoint) — both None when metrics are off."""
        if self.metrics_port is None:
            return None, None
        from prometheus_client import CollectorRegistry

        from lepton.metrics import ClientCallCollector, MetricsEndpoint

        registry = CollectorRegistry()
        registry.register(ClientCallCollector())
        if collector_factory is not None:
            registry.register(collector_factory())  # type: ignore[arg-type]
        return registry, MetricsEndpoint(registry, self.metrics_host, self.metrics_port)
