"""``lepton up``: a whole cluster as separate OS processes on loopback.

Starts ``lepton coordinator``, then ``lepton ps`` and ``lepton worker`` processes pointed at it,
shows progress from the coordinator's status and event stream, and on the job's end (or Ctrl-C,
SIGTERM, timeout) stops every child: SIGTERM, a grace period, then SIGKILL. Children also get
SIGTERM from the kernel if this process dies (PR_SET_PDEATHSIG), so none is orphaned.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from lepton import threads
from lepton.config import JobSpec
from lepton.errors import ConfigError, LeptonError
from lepton.placement import Placements
from lepton.process import EXIT_CONFIG, EXIT_JOB_FAILED, EXIT_OK, EXIT_STATE_NOT_SAVED, stop_event_on_signals
from lepton.certs import make_dev_pki
from lepton.retry import RetryPolicy
from lepton.scale import ScaleControl, default_max_workers, plan_scale, worker_index, worker_name
from lepton.security import INSECURE, Security, is_loopback, load_security
from lepton.tasks import REGRESSION, Evaluation
from lepton.status import FINAL_STATUS_FILE, state_name, status_dict, to_plain
from lepton.v1 import coordinator_pb2 as cpb
from lepton.wire import evaluation_from_proto

if TYPE_CHECKING:
    from lepton.clients import CoordinatorClient, LayoutInfo, ParameterClient

log = structlog.get_logger("lepton.up")
TERMINAL = (cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED)
READY_TIMEOUT_S = 120.0
CHILD_EXIT_TIMEOUT_S = 20.0
STOP_GRACE_S = 10.0
POLL_S = 0.5
MAX_RESTARTS = 5


@dataclass(frozen=True)
class Cluster:
    """What ``lepton up`` runs: the job, how many workers (now and at most), where, how.

    Raises:
        ConfigError: fewer than one worker, or ``max_workers`` below ``workers``.
    """

    spec: JobSpec
    workers: int
    coordinator_port: int = 0
    state_dir: str | None = None
    log_format: str = "auto"
    secure: bool = False
    max_workers: int | None = None  # None: max(workers, lepton.scale.DEFAULT_MAX_WORKERS)
    worker_delay_s: float = 0.0  # test/demo hook: worker-0 sleeps this long before each push

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1 (got {self.workers})")
        if self.max_workers is not None and self.max_workers < self.workers:
            raise ConfigError(f"--max-workers {self.max_workers} is below --workers {self.workers}")
        if self.worker_delay_s < 0:
            raise ConfigError(f"--worker-delay must be >= 0 (got {self.worker_delay_s})")

    def worker_flags(self, name: str) -> list[str]:
        """Flags for worker ``name`` beyond the common ones: the slow-worker hook for worker-0 only."""
        return ["--step-delay", repr(self.worker_delay_s)] if self.worker_delay_s and name == worker_name(0) else []

    @property
    def worker_cap(self) -> int:
        return default_max_workers(self.workers) if self.max_workers is None else self.max_workers


def lepton_command() -> list[str]:
    """The ``lepton`` console script beside this interpreter, else ``python -m lepton``."""
    script = Path(sys.executable).with_name("lepton")
    if script.exists():
        return [str(script)]
    found = shutil.which("lepton")
    return [found] if found else [sys.executable, "-m", "lepton"]


def job_flags(spec: JobSpec) -> list[str]:
    return [
        "--dataset", spec.dataset,
        "--model", spec.model,
        "--loss", spec.loss,
        "--task", spec.task,
        "--epochs", str(spec.epochs),
        "--batch-size", str(spec.batch_size),
        "--lr", repr(spec.lr),
        "--optimizer", spec.optimizer,
        "--optimizer-kwargs", json.dumps(dict(spec.optimizer_kwargs)),
        "--lr-schedule", spec.lr_schedule, "--lr-schedule-kwargs", json.dumps(dict(spec.lr_schedule_kwargs)),
        "--staleness", str(spec.staleness),
        "--async-lr-scaling", spec.async_lr_scaling,
        "--mode", spec.mode,
        "--shards", str(spec.shards_per_epoch),
        "--seed", str(spec.seed),
        "--heartbeat-interval", repr(spec.heartbeat_interval_s),
        "--heartbeat-timeout", repr(spec.heartbeat_timeout_s),
        "--lease-timeout", repr(spec.lease_timeout_s),
        "--parameter-servers", str(spec.parameter_servers),
        "--checkpoint-every", str(spec.checkpoint_every_steps),
    ]


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
    ``lepton.cli.main``), else the last line of its log (argparse's message, for one)."""
    facts = read_ready(ready_path) if ready_path is not None else None
    if facts and facts.get("pid") == child.process.pid and facts.get("error"):
        return ConfigError(f"{child.name}: {facts['error']}")
    return ConfigError(f"{child.name}: {last_line(child.log_path) or 'refused its configuration'} (log: {child.log_path})")


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


class EventTally:
    """Follows WatchJob on a thread and counts completions per (epoch, shard) independently of the
    coordinator's own counters; reconnects (from the last sequence seen) when the coordinator
    restarts."""

    def __init__(self, client: CoordinatorClient) -> None:
        self.completions: dict[tuple[int, int], int] = {}
        self.events = 0
        self._client = client
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="events", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        sequence = 0
        while not self._done.is_set():
            try:
                for event in self._client.watch(sequence):
                    sequence = event.sequence
                    self.events += 1
                    if event.kind == cpb.EVENT_KIND_SHARD_COMPLETED:
                        key = (event.epoch, event.shard)
                        self.completions[key] = self.completions.get(key, 0) + 1
            except LeptonError:
                pass
            self._done.wait(0.5)

    def close(self) -> None:
        self._done.set()


class ServerStatusTally:
    """Asks each parameter server for GetServerStatus (every poll): keeps its newest answer and the
    largest ssp clock gap any of its incarnations reported (a restarted server counts from 0 again),
    so the report has them even though servers exit on their own once the job is over."""

    def __init__(self, security: Security = INSECURE, timeout_s: float = 1.0) -> None:
        self._security = security
        self._timeout_s = timeout_s
        self._clients: dict[str, ParameterClient] = {}  # by address: a restarted server has a new one
        self.latest: dict[str, dict] = {}
        self.max_clock_gap: dict[str, int] = {}
        self.max_compute_gap: dict[str, int] = {}

    def poll(self, name: str, address: str) -> None:
        from lepton.clients import ParameterClient

        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = ParameterClient(address, self._timeout_s, security=self._security)
        try:
            answer = client.server_status()
        except LeptonError:
            return  # gone or restarting: keep what it said last
        self.max_clock_gap[name] = max(self.max_clock_gap.get(name, 0), answer.max_clock_gap)
        self.max_compute_gap[name] = max(self.max_compute_gap.get(name, 0), answer.max_compute_gap)
        self.latest[name] = {
            **to_plain(answer),
            "max_clock_gap": self.max_clock_gap[name],
            "max_compute_gap": self.max_compute_gap[name],
        }

    def read_final(self, name: str, path: Path) -> bool:
        """Takes the status the server wrote as it stopped (FINAL_STATUS_FILE) over the last poll,
        which can miss its last steps; False (the poll stands) if there is none or it is unreadable."""
        try:
            final = json.loads(path.read_text())
            clock_gap, compute_gap = int(final["max_clock_gap"]), int(final["max_compute_gap"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        self.max_clock_gap[name] = max(self.max_clock_gap.get(name, 0), clock_gap)
        self.max_compute_gap[name] = max(self.max_compute_gap.get(name, 0), compute_gap)
        self.latest[name] = {
            **final,
            "max_clock_gap": self.max_clock_gap[name],
            "max_compute_gap": self.max_compute_gap[name],
            "final": True,
        }
        return True

    def report(self) -> dict:
        """The report's ``parameter_server_status`` (by child name; ``final`` when it is what the
        server wrote as it stopped, not the last poll) and ``max_clock_gap`` (over all servers;
        None if none ever answered)."""
        return {
            "parameter_server_status": dict(sorted(self.latest.items())),
            "max_clock_gap": max(self.max_clock_gap.values(), default=None),
            "max_compute_gap": max(self.max_compute_gap.values(), default=None),
        }

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


class ProgressLine:
    """One status line: rewritten in place on a terminal, printed on change (at most every few
    seconds) otherwise."""

    def __init__(self, stream=sys.stdout) -> None:
        self._stream = stream
        self._tty = stream.isatty()
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


def build_report(
    status: cpb.GetStatusResponse | None,
    outcome: str,
    cluster: Cluster,
    tally: EventTally | None,
    wall_s: float,
    address: str,
    state_dir: Path,
    exit_codes: dict[str, int | None],
) -> dict:
    spec = cluster.spec
    report: dict = {
        "status": outcome,
        "mode": spec.mode,
        "dataset": spec.dataset,
        "model": spec.model,
        "loss": spec.loss,
        "optimizer": spec.optimizer,
        "lr": spec.lr,
        "workers": cluster.workers,
        "parameter_servers": spec.parameter_servers,
        "epochs": spec.epochs,
        "shards_per_epoch": spec.shards_per_epoch,
        "batch_size": spec.batch_size,
        "wall_seconds": round(wall_s, 3),
        "coordinator": address,
        "state_dir": str(state_dir),
        "exit_codes": exit_codes,
    }
    if status is not None:
        ev = status.evaluation if status.has_evaluation else None
        report.update(evaluation_report(evaluation_from_proto(ev) if ev else None))
        report.update(
            shard_completions=status.shard_completions,
            duplicate_completions_rejected=status.duplicate_completions_rejected,
            reassignments=status.reassignments,
            members_declared_dead=status.members_declared_dead,
            samples_per_second=status.samples_per_second,
            inference_samples_per_second=ev.inference_samples_per_second if ev else None,
            samples_trained=status.samples_trained,
            training_seconds=status.training_seconds,
            failure=status.failure or None,
            ps_restarts=status.ps_restarts,
            steps_rolled_back=status.steps_rolled_back,
            quarantined_shards=list(status.quarantined_shards),
            leases_expired=status.leases_expired,
            final_status=status_dict(status),
        )
    if tally is not None:
        per_epoch = [0] * spec.epochs
        for (epoch, _), count in tally.completions.items():
            if 0 <= epoch < spec.epochs:
                per_epoch[epoch] += count
        report["observed_completions_per_epoch"] = per_epoch
        report["observed_shards_completed_more_than_once"] = sum(
            1 for count in tally.completions.values() if count > 1
        )
    return report


def layout_dict(layout: LayoutInfo | None) -> dict | None:
    """What each parameter server held: tensor names (row slices as ``name[start:end]``), bytes,
    and which tensors are row-sparse."""
    if layout is None:
        return None
    return {
        "version": layout.version,
        "servers": {
            s.member_id: {
                "tensors": [t.name for t in s.tensors],
                "bytes": sum(t.nbytes for t in s.tensors),
                "sparse": [t.name for t in s.tensors if t.sparse],
            }
            for s in layout.servers
        },
    }


STALE_COUNTERS = ("lepton_stale_requests_rejected_total", "lepton_ps_stale_requests_rejected_total")
SERVER_PAST_DEADLINE = ("lepton_rpc_server_past_deadline_total",)
CLIENT_PAST_DEADLINE = ("lepton_rpc_client_past_deadline_total",)
GUARD_CANCELLED = ("lepton_rpc_client_cancelled_past_deadline_total",)


def scrape_counters(address: str | None, groups: dict[str, tuple[str, ...]]) -> dict[str, float] | None:
    """For each group, the sum of the named counters (over all their labels) on a /metrics
    endpoint; None if unreachable."""
    if not address:
        return None
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=1.0) as response:
            text = response.read().decode()
    except OSError:
        return None
    totals = dict.fromkeys(groups, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        for group, names in groups.items():
            if name in names:
                totals[group] += float(value)
    return totals



def run_up(cluster: Cluster, report_path: str | None, timeout_s: float) -> int:
    spec = cluster.spec
    state_dir = Path(cluster.state_dir or tempfile.mkdtemp(prefix="lepton-up-"))
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stop = stop_event_on_signals()
    placements = Placements.from_env()
    # intra-op threads: the cores shared among the servers and workers (lepton.threads)
    env = threads.child_environment(spec.parameter_servers + cluster.workers)
    children = Children(log_dir, placements=placements, env=env)
    started = time.monotonic()
    outcome = "failed"
    status: cpb.GetStatusResponse | None = None
    tally: EventTally | None = None
    address = ""
    client: CoordinatorClient | None = None
    layout: LayoutInfo | None = None
    child_log = ["--log-format", "json" if cluster.log_format == "auto" else cluster.log_format]
    server_flags: list[str] = []
    client_flags: list[str] = []

    def plaintext(name: str) -> list[str]:
        """Without --secure, a server placed on a non-loopback host (LEPTON_PLACEMENT: the chaos
        suite's private network namespaces) serves plaintext there on purpose, and says so."""
        return [] if cluster.secure or is_loopback(placements(name).host) else ["--insecure"]

    security = INSECURE
    metrics: dict[str, str | None] = {}
    stale_seen: dict[str, float] = {}
    past_deadline: dict[str, dict[str, float]] = {}
    workers: Workers | None = None
    control: ScaleControl | None = None
    scale_events: list[dict] = []
    servers: ServerStatusTally | None = None
    refused = ""
    coordinator_exit = ""  # how the coordinator ended, when it exited for good before the job did
    try:
        if cluster.secure:
            pki = make_dev_pki(state_dir / "security", ["localhost", "127.0.0.1"], parameter_servers=spec.parameter_servers)
            tls = ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--tls-ca", str(pki["ca"])]
            server_flags = [*tls, "--auth-file", str(pki["auth"])]
            client_flags = tls
            security = load_security(
                tls_cert=str(pki["cert"]), tls_key=str(pki["key"]), tls_ca=str(pki["ca"]),
                token_file=str(pki["reader-token"]),
            )
            print(f"security: mutual TLS and role tokens from {state_dir / 'security'}", flush=True)
            # Each server its own token bound to its id; workers (ids assigned) share one bound to worker-*.
            token = {f"ps-{i}": ["--token-file", str(pki[f"ps-{i}-token"])] for i in range(spec.parameter_servers)}
            token["worker"] = ["--token-file", str(pki["worker-token"])]
        else:
            token = {f"ps-{i}": [] for i in range(spec.parameter_servers)} | {"worker": []}
        ready_files = {}

        def ready_file(name: str) -> list[str]:
            ready_files[name] = state_dir / f"{name}.ready.json"
            ready_files[name].unlink(missing_ok=True)
            return ["--ready-file", str(ready_files[name]), "--metrics-port", "0"]

        coordinator = children.start(
            "coordinator",
            ["coordinator", "--listen", f"{placements('coordinator').host}:{cluster.coordinator_port}",
             *ready_file("coordinator"),
             "--state-dir", str(state_dir / "coordinator"), *job_flags(spec), *server_flags,
             *plaintext("coordinator"), *child_log],
        )
        facts = wait_ready_file(ready_files["coordinator"], coordinator, READY_TIMEOUT_S)
        address = facts["address"]
        metrics["coordinator"] = facts.get("metrics")
        print(f"coordinator listening on {address}  (lepton status --coordinator {address})", flush=True)
        print(f"logs in {log_dir}", flush=True)
        for i in range(spec.parameter_servers):
            children.start(
                f"ps-{i}",
                ["ps", "--coordinator", address, "--listen", f"{placements(f'ps-{i}').host}:0", "--id", f"ps-{i}",
                 *ready_file(f"ps-{i}"),
                 "--state-dir", str(state_dir / f"ps-{i}"), *server_flags, *token[f"ps-{i}"],
                 *plaintext(f"ps-{i}"), *child_log],
            )
        workers = Workers(
            children,
            lambda name: ["worker", "--coordinator", address, *ready_file(name), *cluster.worker_flags(name),
                          "--metrics-host", placements(name).host, *client_flags, *token["worker"], *child_log],
        )
        workers.start([worker_name(i) for i in range(cluster.workers)])
        for child in children.items[1:]:
            metrics[child.name] = wait_ready_file(ready_files[child.name], child, READY_TIMEOUT_S).get("metrics")
        print("metrics: " + "  ".join(f"{name} http://{where}/metrics" for name, where in metrics.items()), flush=True)
        # Imported only now (it brings torch): a refused configuration is reported sooner.
        from lepton.clients import CoordinatorClient

        client = CoordinatorClient(
            address, timeout_s=5.0, retry=RetryPolicy(max_attempts=5, max_total_s=15.0), security=security
        )
        tally = EventTally(client)
        servers = ServerStatusTally(security)
        line = ProgressLine()
        deadline = started + timeout_s
        listen = f"{placements('coordinator').host}:{cluster.coordinator_port}"
        coordinator_args = [a if a != listen else address for a in coordinator.args]
        control = ScaleControl(state_dir, address, cluster.workers, cluster.worker_cap)
        print(f"scale with: lepton scale --state-dir {state_dir} --workers K  (1 <= K <= {cluster.worker_cap})",
              flush=True)
        while True:
            if stop.wait(POLL_S):
                outcome = "interrupted"
                break
            for child in children.items:
                # Restarting a process that refused its configuration would only refuse again.
                if child.process.poll() == EXIT_CONFIG and child.name not in workers.retired:
                    raise refusal(child, ready_files.get(child.name))
            if coordinator.process.poll() is not None:
                if not coordinator.failed or coordinator.restarts >= MAX_RESTARTS:
                    outcome = "failed"
                    coordinator_exit = coordinator.exited()
                    print(f"\n{coordinator_exit}", flush=True)
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
                event = apply_scale(request, workers, control, cluster.worker_cap, time.monotonic() - started)
                if event is not None:
                    scale_events.append(event)
            try:
                status = client.status()
            except LeptonError as exc:
                log.warning("status_failed", error=str(exc))
                continue
            line.show(status, workers.alive(), len(workers.active()))
            for child in children.items:  # a restarted or added child serves metrics on a new port
                if child.name in ready_files and (child.restarts or child.name not in metrics):
                    facts = read_ready(ready_files[child.name])
                    if facts and facts.get("pid") == child.process.pid:
                        metrics[child.name] = facts.get("metrics")
            # Fenced requests refused and requests that outlived their deadline so far, per process
            # (a counter survives until its process dies; a restarted one starts again from 0).
            for name, where in metrics.items():
                seen = scrape_counters(
                    where,
                    {"stale": STALE_COUNTERS, "server": SERVER_PAST_DEADLINE, "client": CLIENT_PAST_DEADLINE,
                     "guard_cancelled": GUARD_CANCELLED},
                )
                if seen is None:
                    continue
                if not name.startswith("worker"):
                    stale_seen[name] = max(stale_seen.get(name, 0.0), seen["stale"])
                past = past_deadline.setdefault(name, {"server": 0.0, "client": 0.0, "guard_cancelled": 0.0})
                for side in past:
                    past[side] = max(past[side], seen[side])
            # Before the terminal check: servers leave soon after the job ends.
            for child in children.items:
                if child.name.startswith("ps"):
                    facts = read_ready(ready_files[child.name])
                    if facts and facts.get("pid") == child.process.pid and facts.get("address"):
                        servers.poll(child.name, facts["address"])
            if layout is None and status.state == cpb.JOB_STATE_TRAINING:
                try:
                    layout = client.layout()
                except LeptonError:
                    pass
            if status.state in TERMINAL:
                outcome = "succeeded" if status.state == cpb.JOB_STATE_SUCCEEDED else "failed"
                break
            if time.monotonic() > deadline:
                outcome = "timeout"
                break
        line.done()
        control.close()  # no more scale requests: the job is over or being stopped
        if outcome in ("succeeded", "failed"):
            # Members leave by themselves once they see the job is over.
            members = [c for c in children.items if c.name != "coordinator"]
            end = time.monotonic() + CHILD_EXIT_TIMEOUT_S
            for child in members:
                try:
                    child.process.wait(timeout=max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
    except ConfigError as exc:
        outcome = "refused"
        refused = str(exc)
    except ChildFailed as exc:
        print(f"lepton up: {exc}", file=sys.stderr, flush=True)
        outcome = "failed"
    finally:
        if control is not None:
            control.close()
        if tally is not None:
            tally.close()
        if servers is not None:
            servers.close()
        children.stop_all()
        if client is not None:
            client.close()
    wall_s = time.monotonic() - started
    exit_codes = {c.name: c.process.returncode for c in children.items}
    if servers is not None:
        for child in children.items:
            if child.name.startswith("ps-"):
                servers.read_final(child.name, state_dir / child.name / FINAL_STATUS_FILE)
    report = build_report(status, outcome, cluster, tally, wall_s, address, state_dir, exit_codes)
    report["metrics_endpoints"] = metrics
    report["stale_requests_rejected"] = int(sum(stale_seen.values()))
    report["requests_past_deadline"] = {
        name: {side: int(n) for side, n in sides.items()} for name, sides in past_deadline.items()
    }
    report["restarts"] = {c.name: c.restarts for c in children.items if c.restarts}
    report["coordinator_restarts"] = sum(c.restarts for c in children.items if c.name == "coordinator")
    report["secure"] = cluster.secure
    report["max_workers"] = cluster.worker_cap
    report["workers_at_end"] = len(workers.active()) if workers is not None else 0
    report["scale_events"] = scale_events
    report["layout"] = layout_dict(layout)
    report.update(
        servers.report() if servers is not None
        else {"parameter_server_status": {}, "max_clock_gap": None, "max_compute_gap": None}
    )
    if coordinator_exit and not report.get("failure"):
        report["failure"] = coordinator_exit
    if refused:
        report["failure"] = refused
    else:
        print_summary(report)
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=2))
        print(f"report written to {report_path}")
    if refused:
        # Last, so that it is the line a person sees: the job never started.
        print(f"lepton up: {refused}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    return EXIT_OK if outcome == "succeeded" else EXIT_JOB_FAILED


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


def evaluation_report(ev: Evaluation | None) -> dict:
    """The report's test_* keys: the loss and the metrics of the job's task (None without an
    evaluation; a regression job's accuracy and recall keys are None, a classification job's
    MSE, MAE and R² keys too)."""
    regression = ev is not None and ev.task == REGRESSION
    return {
        "task": ev.task if ev else None,
        "test_loss": ev.loss if ev else None,
        "test_accuracy": ev.accuracy if ev else None,
        "test_macro_recall": ev.macro_recall if ev else None,
        "test_per_class_recall": [None if r != r else r for r in ev.per_class_recall] if ev and not regression else None,
        "test_confusion_matrix": [list(row) for row in ev.confusion_matrix] if ev and not regression else None,
        "test_mse": ev.mse if ev else None,
        "test_mae": ev.mae if ev else None,
        "test_r2": ev.r2 if ev else None,
    }


def print_summary(report: dict) -> None:
    def fmt(key: str, digits: int = 4) -> str:
        value = report.get(key)
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    print(
        "\n".join(
            [
                f"job {report['status']} in {report['wall_seconds']:.1f}s "
                f"({report['mode']}, {report['dataset']}, {report['workers']} workers, "
                f"{report['parameter_servers']} parameter servers)",
                (
                    f"  test mse {fmt('test_mse')}  mae {fmt('test_mae')}  r2 {fmt('test_r2')}  loss {fmt('test_loss')}"
                    if report.get("task") == REGRESSION
                    else f"  test accuracy {fmt('test_accuracy')}  macro recall {fmt('test_macro_recall')}  "
                    f"loss {fmt('test_loss')}"
                ),
                f"  shard completions {fmt('shard_completions')} of {report['epochs'] * report['shards_per_epoch']}"
                f"  duplicates rejected {fmt('duplicate_completions_rejected')}"
                f"  reassignments {fmt('reassignments')}  members declared dead {fmt('members_declared_dead')}",
                f"  training {fmt('samples_per_second', 0)} samples/s  "
                f"inference {fmt('inference_samples_per_second', 0)} samples/s",
            ]
            + ([f"  failure: {report['failure']}"] if report.get("failure") else [])
        ),
        flush=True,
    )
