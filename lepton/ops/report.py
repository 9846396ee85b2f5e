"""What ``lepton up`` saw of the job, and the report it makes of it: the JSON file ``--report``
writes and the summary it prints (docs/cli.md lists the keys)."""

from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lepton.errors import LeptonError
from lepton.ops.children import Children, read_ready
from lepton.ops.cluster import Cluster
from lepton.ops.curves import Curves
from lepton.security import INSECURE, Security
from lepton.status import FINAL_STATUS_FILE, status_dict, to_plain
from lepton.v1 import coordinator_pb2 as cpb

if TYPE_CHECKING:
    from lepton.clients import CoordinatorClient, LayoutInfo, ParameterClient
    from lepton.tasks import Evaluation

# lepton.tasks.REGRESSION: that module (like lepton.wire) brings torch, which `lepton up` needs only
# to read the final evaluation, so it is imported there and not on the way to starting the cluster.
REGRESSION = "regression"


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


@dataclass
class Observed:
    """What ``lepton up`` saw while the job ran: the report's raw material, filled in by the
    supervisor as it watches."""

    outcome: str = "failed"  # succeeded, failed, interrupted, timeout or refused
    refused: str = ""  # why a child refused its configuration
    coordinator_exit: str = ""  # how the coordinator ended, when it exited for good before the job did
    address: str = ""
    status: cpb.GetStatusResponse | None = None
    layout: LayoutInfo | None = None
    tally: EventTally | None = None
    servers: ServerStatusTally | None = None
    metrics: dict[str, str | None] = field(default_factory=dict)  # /metrics endpoint by child name
    stale_seen: dict[str, float] = field(default_factory=dict)
    past_deadline: dict[str, dict[str, float]] = field(default_factory=dict)
    scale_events: list[dict] = field(default_factory=list)
    workers_at_end: int = 0
    pages: dict[str, str | None] = field(default_factory=dict)  # each child's /metrics page, last poll
    curves: Curves | None = None

    def scrape(self) -> None:
        """Fenced requests refused and requests that outlived their deadline so far, per process
        (a counter survives until its process dies; a restarted one starts again from 0)."""
        self.pages = {}
        for name, where in self.metrics.items():
            page = self.pages[name] = fetch_page(where)
            if page is None:
                continue
            seen = sum_counters(
                page,
                {"stale": STALE_COUNTERS, "server": SERVER_PAST_DEADLINE, "client": CLIENT_PAST_DEADLINE,
                 "guard_cancelled": GUARD_CANCELLED},
            )
            if not name.startswith("worker"):
                self.stale_seen[name] = max(self.stale_seen.get(name, 0.0), seen["stale"])
            past = self.past_deadline.setdefault(name, {"server": 0.0, "client": 0.0, "guard_cancelled": 0.0})
            for side in past:
                past[side] = max(past[side], seen[side])


def make_report(seen: Observed, cluster: Cluster, children: Children, wall_s: float, state_dir: Path) -> dict:
    """The report of a finished ``lepton up`` (its children stopped): the job's settings, how it
    ended, and what was seen of it."""
    exit_codes = {c.name: c.process.returncode for c in children.items}
    if seen.servers is not None:
        for child in children.items:
            if child.name.startswith("ps-"):
                seen.servers.read_final(child.name, state_dir / child.name / FINAL_STATUS_FILE)
    report = build_report(seen.status, seen.outcome, cluster, seen.tally, wall_s, seen.address, state_dir, exit_codes)
    report["metrics_endpoints"] = seen.metrics
    report["stale_requests_rejected"] = int(sum(seen.stale_seen.values()))
    report["requests_past_deadline"] = {
        name: {side: int(n) for side, n in sides.items()} for name, sides in seen.past_deadline.items()
    }
    report["members"] = member_entries(children, exit_codes, state_dir)
    report["restarts"] = {c.name: c.restarts for c in children.items if c.restarts}
    report["coordinator_restarts"] = sum(c.restarts for c in children.items if c.name == "coordinator")
    report["secure"] = cluster.secure
    report["max_workers"] = cluster.worker_cap
    report["workers_at_end"] = seen.workers_at_end
    report["scale_events"] = seen.scale_events
    report["layout"] = layout_dict(seen.layout)
    report.update(
        seen.servers.report() if seen.servers is not None
        else {"parameter_server_status": {}, "max_clock_gap": None, "max_compute_gap": None}
    )
    if seen.coordinator_exit and not report.get("failure"):
        report["failure"] = seen.coordinator_exit
    if seen.refused:
        report["failure"] = seen.refused
    return report


def member_entries(children: Children, exit_codes: dict[str, int | None], state_dir: Path) -> dict[str, dict]:
    """Per child: its exit code and the peak resident memory its last incarnation measured of
    itself as it exited (``peak_rss_mb``, MiB; None when it did not exit on its own, e.g. killed)
    and of its largest child process (``children_peak_rss_mb``: DataLoader workers)."""
    entries = {}
    for child in children.items:
        facts = read_ready(state_dir / f"{child.name}.ready.json") or {}
        entries[child.name] = {
            "exit_code": exit_codes.get(child.name),
            "peak_rss_mb": facts.get("peak_rss_mb"),
            "children_peak_rss_mb": facts.get("children_peak_rss_mb"),
        }
    return dict(sorted(entries.items()))


def publish(report: dict, report_path: str | None, refused: str) -> None:
    """Prints the summary (not for a refused configuration: the job never started) and writes the
    report to ``report_path``, if given."""
    if not refused:
        print_summary(report)
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=2))
        print(f"report written to {report_path}")

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
        "eval_every_epochs": spec.eval_every_epochs,
        "validation": [],
        "stopped_early": None,
    }
    if status is not None:
        from lepton.wire import evaluation_from_proto, validation_row

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
            validation=[validation_row(row) for row in status.validation],
            stopped_early=status.stopped_early or None,
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
    text = fetch_page(address)
    return None if text is None else sum_counters(text, groups)


def fetch_page(address: str | None) -> str | None:
    """A /metrics endpoint's page, or None if unreachable."""
    if not address:
        return None
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=1.0) as response:
            return response.read().decode()
    except OSError:
        return None


def sum_counters(text: str, groups: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """For each group, the sum of the named counters (over all their labels) on a /metrics page."""
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
        "test_per_class_recall": [None if r != r else r for r in ev.per_class_recall]
        if ev and not regression
        else None,
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
