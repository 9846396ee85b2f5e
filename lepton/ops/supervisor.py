"""``lepton up`` watching its cluster: starts the coordinator, the parameter servers and the
workers, shows progress from the coordinator's status and event stream, restarts children that
crash, carries out ``lepton scale`` requests, and on the job's end (or Ctrl-C, SIGTERM, timeout)
stops every child."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from lepton import threads
from lepton.errors import ConfigError, LeptonError
from lepton.ops.certs import make_dev_pki
from lepton.ops.children import Child, ChildFailed, Children, Workers, read_ready, refusal, wait_ready_file
from lepton.ops.cluster import Cluster, job_flags
from lepton.ops.curves import TENSORBOARD_DIR, Curves
from lepton.ops.placement import Placements
from lepton.ops.report import EventTally, Observed, ServerStatusTally
from lepton.ops.scale import ScaleControl, worker_name
from lepton.process import EXIT_CONFIG
from lepton.retry import RetryPolicy
from lepton.security import INSECURE, Security, is_loopback, load_security
from lepton.status import state_name
from lepton.v1 import coordinator_pb2 as cpb

if TYPE_CHECKING:
    from lepton.coordinator_client import CoordinatorClient

log = structlog.get_logger("lepton.up")
TERMINAL = (cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED)
READY_TIMEOUT_S = 120.0
CHILD_EXIT_TIMEOUT_S = 20.0
POLL_S = 0.5
MAX_RESTARTS = 5


class Supervisor:
    """Runs one cluster from start to stop and fills in an ``Observed`` as it goes."""

    def __init__(self, cluster: Cluster, state_dir: Path, stop: threading.Event) -> None:
        self.cluster = cluster
        self.state_dir = state_dir
        self.log_dir = state_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stop = stop
        self.placements = Placements.from_env()
        # intra-op threads: the cores shared among the servers and workers (lepton.threads)
        env = threads.child_environment(cluster.spec.parameter_servers + cluster.workers)
        self.children = Children(self.log_dir, placements=self.placements, env=env)
        self.started = time.monotonic()
        self.seen = Observed()
        self.workers: Workers | None = None
        self.control: ScaleControl | None = None
        self.client: CoordinatorClient | None = None
        self.security: Security = INSECURE
        self.ready_files: dict[str, Path] = {}
        self._child_log = ["--log-format", "json" if cluster.log_format == "auto" else cluster.log_format]
        self._server_flags: list[str] = []
        self._client_flags: list[str] = []
        self._token: dict[str, list[str]] = {}

    def run(self, timeout_s: float) -> Observed:
        """Starts the cluster, watches it until the job ends, is interrupted or ``timeout_s`` has
        passed since the start, and stops every child. A refused configuration ends as outcome
        ``refused`` with the reason in ``refused``."""
        seen = self.seen
        try:
            self._secure()
            coordinator = self._start_cluster()
            self._watch(coordinator, self.started + timeout_s)
        except ConfigError as exc:
            seen.outcome = "refused"
            seen.refused = str(exc)
        except ChildFailed as exc:
            print(f"lepton up: {exc}", file=sys.stderr, flush=True)
            seen.outcome = "failed"
        finally:
            if self.control is not None:
                self.control.close()
            if seen.tally is not None:
                seen.tally.close()
            if seen.servers is not None:
                seen.servers.close()
            self.children.stop_all()
            if self.client is not None:
                self.client.close()
        seen.workers_at_end = len(self.workers.active()) if self.workers is not None else 0
        return seen

    def _plaintext(self, name: str) -> list[str]:
        """Without --secure, a server placed on a non-loopback host (LEPTON_PLACEMENT: the chaos
        suite's private network namespaces) serves plaintext there on purpose, and says so."""
        return [] if self.cluster.secure or is_loopback(self.placements(name).host) else ["--insecure"]

    def _ready_file(self, name: str) -> list[str]:
        self.ready_files[name] = self.state_dir / f"{name}.ready.json"
        self.ready_files[name].unlink(missing_ok=True)
        return ["--ready-file", str(self.ready_files[name]), "--metrics-port", "0"]

    def _secure(self) -> None:
        """With --secure: a fresh development PKI in the state dir, and the flags and tokens that use it."""
        spec = self.cluster.spec
        if not self.cluster.secure:
            self._token = {f"ps-{i}": [] for i in range(spec.parameter_servers)}
            self._token["worker"] = []
            return
        pki = make_dev_pki(
            self.state_dir / "security", ["localhost", "127.0.0.1"], parameter_servers=spec.parameter_servers
        )
        tls = ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--tls-ca", str(pki["ca"])]
        self._server_flags = [*tls, "--auth-file", str(pki["auth"])]
        self._client_flags = tls
        self.security = load_security(
            tls_cert=str(pki["cert"]), tls_key=str(pki["key"]), tls_ca=str(pki["ca"]),
            token_file=str(pki["reader-token"]),
        )
        print(f"security: mutual TLS and role tokens from {self.state_dir / 'security'}", flush=True)
        # Each server its own token bound to its id; workers (ids assigned) share one bound to worker-*.
        self._token = {f"ps-{i}": ["--token-file", str(pki[f"ps-{i}-token"])] for i in range(spec.parameter_servers)}
        self._token["worker"] = ["--token-file", str(pki["worker-token"])]

    def _start_cluster(self) -> Child:
        """Starts every child and waits until each is ready; returns the coordinator."""
        cluster, spec, children, seen = self.cluster, self.cluster.spec, self.children, self.seen
        placements, state_dir = self.placements, self.state_dir
        coordinator = children.start(
            "coordinator",
            ["coordinator", "--listen", f"{placements('coordinator').host}:{cluster.coordinator_port}",
             *self._ready_file("coordinator"),
             "--state-dir", str(state_dir / "coordinator"), *job_flags(spec), *self._server_flags,
             *self._plaintext("coordinator"), *self._child_log],
        )
        facts = wait_ready_file(self.ready_files["coordinator"], coordinator, READY_TIMEOUT_S)
        address = seen.address = facts["address"]
        seen.metrics["coordinator"] = facts.get("metrics")
        print(f"coordinator listening on {address}  (lepton status --coordinator {address})", flush=True)
        print(f"logs in {self.log_dir}", flush=True)
        for i in range(spec.parameter_servers):
            children.start(
                f"ps-{i}",
                ["ps", "--coordinator", address, "--listen", f"{placements(f'ps-{i}').host}:0", "--id", f"ps-{i}",
                 *self._ready_file(f"ps-{i}"),
                 "--state-dir", str(state_dir / f"ps-{i}"), *self._server_flags, *self._token[f"ps-{i}"],
                 *self._plaintext(f"ps-{i}"), *self._child_log],
            )
        self.workers = Workers(
            children,
            lambda name: ["worker", "--coordinator", address, *self._ready_file(name), *cluster.worker_flags(name),
                          "--metrics-host", placements(name).host, *self._client_flags, *self._token["worker"],
                          *self._child_log],
        )
        self.workers.start([worker_name(i) for i in range(cluster.workers)])
        for child in children.items[1:]:
            seen.metrics[child.name] = wait_ready_file(self.ready_files[child.name], child, READY_TIMEOUT_S).get(
                "metrics"
            )
        print(
            "metrics: " + "  ".join(f"{name} http://{where}/metrics" for name, where in seen.metrics.items()),
            flush=True,
        )
        return coordinator

    def _watch(self, coordinator: Child, deadline: float) -> None:
        """Polls until the job ends, the launcher is stopped or ``deadline`` passes; sets the outcome."""
        cluster, children, seen, state_dir = self.cluster, self.children, self.seen, self.state_dir
        workers = self.workers
        assert workers is not None
        from lepton.coordinator_client import CoordinatorClient

        client = self.client = CoordinatorClient(
            seen.address, timeout_s=5.0, retry=RetryPolicy(max_attempts=5, max_total_s=15.0), security=self.security
        )
        seen.tally = EventTally(client)
        seen.servers = ServerStatusTally(self.security)
        seen.curves = Curves(state_dir / TENSORBOARD_DIR)
        line = ProgressLine()
        listen = f"{self.placements('coordinator').host}:{cluster.coordinator_port}"
        coordinator_args = [a if a != listen else seen.address for a in coordinator.args]
        control = self.control = ScaleControl(state_dir, seen.address, cluster.workers, cluster.worker_cap)
        print(f"scale with: lepton scale --state-dir {state_dir} --workers K  (1 <= K <= {cluster.worker_cap})",
              flush=True)
        while True:
            if self.stop.wait(POLL_S):
                seen.outcome = "interrupted"
                break
            for child in children.items:
                # Restarting a process that refused its configuration would only refuse again.
                if child.process.poll() == EXIT_CONFIG and child.name not in workers.retired:
                    raise refusal(child, self.ready_files.get(child.name))
            if coordinator.process.poll() is not None:
                if not coordinator.failed or coordinator.restarts >= MAX_RESTARTS:
                    seen.outcome = "failed"
                    seen.coordinator_exit = coordinator.exited()
                    print(f"\n{seen.coordinator_exit}", flush=True)
                    break
                children.restart(coordinator, coordinator_args)  # same port and state directory
            for child in children.items:
                # Workers start afresh; a parameter server comes back under its id from its checkpoint.
                if (child.name.startswith(("worker", "ps")) and child.name not in workers.retired and child.failed
                        and child.restarts < MAX_RESTARTS):
                    children.restart(child)
            workers.reap(time.monotonic())
            request = control.take_request()
            if request is not None:
                event = apply_scale(request, workers, control, cluster.worker_cap, time.monotonic() - self.started)
                if event is not None:
                    seen.scale_events.append(event)
            try:
                status = seen.status = client.status()
            except LeptonError as exc:
                log.warning("status_failed", error=str(exc))
                continue
            line.show(status, workers.alive(), len(workers.active()))
            self._observe(client)
            if status.state in TERMINAL:
                seen.outcome = "succeeded" if status.state == cpb.JOB_STATE_SUCCEEDED else "failed"
                break
            if time.monotonic() > deadline:
                seen.outcome = "timeout"
                break
        line.done()
        control.close()  # no more scale requests: the job is over or being stopped
        if seen.outcome in ("succeeded", "failed"):
            # Members leave by themselves once they see the job is over.
            members = [c for c in children.items if c.name != "coordinator"]
            end = time.monotonic() + CHILD_EXIT_TIMEOUT_S
            for child in members:
                try:
                    child.process.wait(timeout=max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass

    def _observe(self, client: CoordinatorClient) -> None:
        """One poll's look beyond the job's status: metrics endpoints and counters, the servers'
        own status, and the layout once training has begun."""
        seen = self.seen
        for child in self.children.items:  # a restarted or added child serves metrics on a new port
            if child.name in self.ready_files and (child.restarts or child.name not in seen.metrics):
                facts = read_ready(self.ready_files[child.name])
                if facts and facts.get("pid") == child.process.pid:
                    seen.metrics[child.name] = facts.get("metrics")
        seen.scrape()
        if seen.curves is not None:
            seen.curves.observe(seen.status, seen.pages, time.monotonic())
        # Before the terminal check: servers leave soon after the job ends.
        assert seen.servers is not None and seen.status is not None
        for child in self.children.items:
            if child.name.startswith("ps"):
                facts = read_ready(self.ready_files[child.name])
                if facts and facts.get("pid") == child.process.pid and facts.get("address"):
                    seen.servers.poll(child.name, facts["address"])
        # Also once the job has ended: a short job can end before a poll saw it training (the first
        # poll waits for this process's first import of torch, in ServerStatusTally).
        if seen.layout is None and seen.status.state in (cpb.JOB_STATE_TRAINING, *TERMINAL):
            try:
                seen.layout = client.layout()
            except LeptonError:
                pass


class ProgressLine:
    """One status line: rewritten in place on a terminal, printed on change (at most every few
    seconds) otherwise."""

    def __init__(self, stream=None) -> None:
        self._stream = stream if stream is not None else sys.stdout  # now, not at import (pytest swaps it)
        self._tty = self._stream.isatty()
        self._last = ""
        self._last_print = 0.0

    def show(self, status: cpb.GetStatusResponse, workers_alive: int, workers: int) -> None:
        job = status.job
        loss = "-" if math.isnan(status.recent_loss) else f"{status.recent_loss:.4f}"
        text = (
            f"[{state_name(status.state)}] epoch {status.epoch + 1}/{job.epochs}  "
            f"shards {status.shards_completed_in_epoch}/{job.shards_per_epoch} "
            f"({status.shards_leased} leased)  loss {loss}  "
            f"{status.samples_per_second:.0f} samples/s  workers {workers_alive}/{workers}"
        )
        if self._tty:
            self._stream.write("\r\x1b[2K" + text)
            self._stream.flush()
        elif text != self._last and time.monotonic() - self._last_print >= 2.0:
            print(text, file=self._stream, flush=True)
            self._last_print = time.monotonic()
        self._last = text

    def done(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


def apply_scale(request: dict, workers: Workers, control: ScaleControl, max_workers: int, at_s: float) -> dict | None:
    """Carries out one ``lepton scale`` request and acknowledges it; returns the report's scale event,
    or None when the request was refused (the refusal goes back to the requester)."""
    before = len(workers.active())
    try:
        if request["workers"] is None:
            raise ConfigError("the request names no integer worker count")
        started, stopped = workers.scale(request["workers"], max_workers, time.monotonic())
    except ConfigError as exc:
        control.acknowledge(request["id"], before, before, error=str(exc))
        log.warning("scale_refused", error=str(exc))
        return None
    after = len(workers.active())
    control.acknowledge(request["id"], before, after)
    changes = [f"started {', '.join(started)}"] * bool(started) + [f"stopping {', '.join(stopped)}"] * bool(stopped)
    print(f"\nworkers: {before} -> {after}" + (f" ({'; '.join(changes)})" if changes else ""), flush=True)
    return {"at_s": round(at_s, 3), "from": before, "to": after, "started": started, "stopped": stopped}


