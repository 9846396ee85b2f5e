"""Lepton from Python: a whole local cluster (what ``lepton up`` runs) started from a ``JobSpec``,
its events, its result, and the typed client of a coordinator anywhere."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lepton.config import JobSpec
from lepton.coordinator_client import CoordinatorClient
from lepton.errors import ConfigError, LeptonError
from lepton.v1 import coordinator_pb2 as cpb

TERMINAL_STATES = (cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED)


@dataclass(frozen=True)
class JobResult:
    """How a local job ended: ``outcome`` is "succeeded", "failed", "refused" (the configuration
    cannot work; ``report["failure"]`` says why), "interrupted" (``stop()``) or "timeout";
    ``report`` is what ``lepton up --report`` writes (docs/operations.md)."""

    outcome: str
    report: dict

    @property
    def succeeded(self) -> bool:
        return self.outcome == "succeeded"


class LocalJob:
    """A job's cluster on this machine, as separate processes on loopback (coordinator,
    ``spec.parameter_servers`` parameter servers, ``workers`` workers), supervised on a thread
    from construction until the job ends, ``stop()`` or ``timeout_s``. Use it as a context manager
    (leaving stops it) or call ``wait()``. Progress lines go to stdout, as ``lepton up`` prints.

    Raises:
        ConfigError: from construction, for a cluster that cannot be run (fewer than one worker).
    """

    def __init__(
        self, spec: JobSpec, *, workers: int = 2, state_dir: str | Path | None = None,
        timeout_s: float = 1800.0, secure: bool = False,
    ) -> None:
        from lepton.ops.cluster import Cluster
        from lepton.ops.supervisor import Supervisor

        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        self.spec = spec
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="lepton-local-"))
        self._cluster = Cluster(spec=spec, workers=workers, state_dir=str(self.state_dir), secure=secure)
        self._stop = threading.Event()
        self._supervisor = Supervisor(self._cluster, self.state_dir, self._stop)
        self._result: JobResult | None = None
        self._thread = threading.Thread(target=self._run, args=(timeout_s,), name="lepton-local", daemon=True)
        self._thread.start()

    def _run(self, timeout_s: float) -> None:
        from lepton.ops.report import make_report

        supervisor = self._supervisor
        try:
            seen = supervisor.run(timeout_s)
            wall_s = time.monotonic() - supervisor.started
            report = make_report(seen, self._cluster, supervisor.children, wall_s, self.state_dir)
            if seen.refused:
                report["failure"] = seen.refused
            self._result = JobResult(seen.outcome, report)
        except Exception as exc:  # noqa: BLE001 - the caller of wait() learns what went wrong
            self._result = JobResult("failed", {"status": "failed", "failure": f"{type(exc).__name__}: {exc}"})

    @property
    def address(self) -> str | None:
        """The coordinator's address once it serves (None before, and for a refused job)."""
        return self._supervisor.seen.address or None

    def wait_address(self, timeout_s: float = 120.0) -> str | None:
        """Blocks until the coordinator serves (its address) or the job has ended (None)."""
        deadline = time.monotonic() + timeout_s
        while self.address is None and self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(0.05)
        return self.address

    def client(self) -> CoordinatorClient:
        """A new typed client of this job's coordinator (close it when done). Raises ConfigError
        when the job never served (its configuration was refused)."""
        address = self.wait_address()
        if address is None:
            raise ConfigError(f"the job has no coordinator: {self.wait().report.get('failure', 'it ended')}")
        return CoordinatorClient(address, security=self._supervisor.security)

    def events(self, after_sequence: int = 0) -> Iterator[cpb.JobEvent]:
        """The job's events (``WatchJob``) from ``after_sequence`` on, until the event of its end
        (a JOB_STATE_CHANGED to SUCCEEDED or FAILED) or until the cluster is gone; reconnects
        from the last event seen if the stream breaks while the cluster runs."""
        if self.wait_address() is None:
            return
        client = self.client()
        sequence = after_sequence
        try:
            while True:
                try:
                    for event in client.watch(sequence):
                        sequence = event.sequence
                        yield event
                        if event.kind == cpb.EVENT_KIND_JOB_STATE_CHANGED and event.job_state in TERMINAL_STATES:
                            return
                except LeptonError:
                    if not self._thread.is_alive():
                        return
                    self._thread.join(0.5)  # the coordinator restarts or stops: look again shortly
                if not self._thread.is_alive():
                    return
        finally:
            client.close()

    def wait(self, timeout_s: float | None = None) -> JobResult:
        """Blocks until the cluster has stopped; its result. Raises TimeoutError after ``timeout_s``."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the local job is still running after {timeout_s} s")
        assert self._result is not None
        return self._result

    def stop(self) -> JobResult:
        """Stops every process of the cluster (the job ends "interrupted" unless it had ended)."""
        self._stop.set()
        return self.wait()

    def __enter__(self) -> LocalJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_local(spec: JobSpec, *, workers: int = 2, **options) -> LocalJob:
    """Starts ``spec`` on a local cluster of separate processes (``LocalJob``; ``options``:
    state_dir, timeout_s, secure) and returns at once."""
    return LocalJob(spec, workers=workers, **options)
