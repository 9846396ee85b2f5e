"""The chaos suite: real clusters (``lepton up``), one injected fault each, and the invariants that
must hold whatever the fault:

* the job succeeds;
* every (epoch, shard) is completed exactly once (coordinator count and an independent tally of the
  event stream);
* every child exits by itself or is reaped, and no process outlives the run;
* no request hung: no server handler finished more than 1 s past its client's deadline, and no
  client call returned more than 1 s past its deadline (except the calls of a process the fault
  itself stopped with SIGSTOP: its clock ran on while it was frozen);
* accuracy: in the full matrix (synthetic-image, 10,000 test samples), within 1 point of a
  fault-free run of the same job (three fault-free runs are made; the lowest is the bar); in the CI
  subset (digits, 360 test samples, where one run varies by a few points), at least 0.90: a check
  that the fault did not break training, not a measurement of its cost.

Faults are chosen and timed from a fixed seed; every wait is bounded. The CI subset runs by
default; ``pytest tests/chaos --chaos-full -s`` runs the whole matrix and prints a fault x outcome
table; ``--chaos-mode sync`` (or ``ssp``, with staleness 2) runs it in another consistency mode.
Network partitions run the cluster inside network namespaces (``netns.py``): every child in its
own namespace, joined by a bridge whose port is taken down to cut a member off and brought
back up to heal; they need root and are skipped where namespaces cannot be made.
"""

from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chaos import netns
from lepton.clients import CoordinatorClient
from lepton.errors import LeptonError
from lepton.v1 import common_pb2
from lepton.v1 import coordinator_pb2 as cpb
from support import (
    CHAOS_TABLE,
    Processes,
    cmdline,
    frozen_lease_holder,
    lepton_argv,
    read_json,
    tagged_pids,
    wait_until,
)

pytestmark = pytest.mark.chaos
SEED = 20261126
# The CI subset trains digits (fast; 360 test samples, so one run's accuracy varies by a few
# points and only a floor is checked). The full matrix trains synthetic-image: 10,000 test samples
# (a point is 100 of them), so "within 1 point of a fault-free run" measures the fault, not noise.
CI_JOB = ("--epochs", "8", "--seed", "1")
FULL_JOB = ("--dataset", "synthetic-image", "--epochs", "4", "--batch-size", "128", "--lr", "0.001", "--seed", "1")
RUN_TIMEOUT_S = 300
# The CI rows measured 0.925-0.978 over 28 clean-clone runs (worker-zombie 0.925-0.978,
# worker-short-pause 0.933-0.975); the floor was 0.93 until a 0.925 failed a run. A fault that broke
# training (lost or doubled updates, a wrong layout) lands far lower; the cost of a fault in
# points is what the full matrix measures.
CI_ACCURACY_FLOOR = 0.90
CI_SUBSET = ("worker-zombie", "worker-short-pause")
TABLE = CHAOS_TABLE  # printed by tests/conftest.py at the end of the session
BASELINE_RUNS = 3
MEMBERS = ["coordinator", "ps-0", "ps-1", "worker-0", "worker-1", "worker-2", "worker-3"]
STATUS_SCRIPT = (  # grpc and the stubs only: starts in a fraction of a second
    "import base64, sys, grpc\n"
    "from lepton.v1 import coordinator_pb2 as pb, coordinator_pb2_grpc as rpc\n"
    "with grpc.insecure_channel(sys.argv[1]) as channel:\n"
    "    reply = rpc.CoordinatorStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)\n"
    "print(base64.b64encode(reply.SerializeToString()).decode())\n"
)


@dataclass
class Cluster:
    processes: Processes
    state: Path
    address: str
    rng: random.Random
    notes: dict
    fabric: netns.Fabric | None = None
    client: CoordinatorClient | None = field(default=None)

    def status(self):
        if self.fabric is None:
            if self.client is None:
                self.client = CoordinatorClient(self.address)
            try:
                return self.client.status()
            except LeptonError:
                return None
        # The coordinator lives in a namespace: ask from the hub, get the message's bytes back.
        try:
            done = subprocess.run(
                self.fabric.in_hub([sys.executable, "-c", STATUS_SCRIPT, self.address]),
                capture_output=True, text=True, timeout=30,
            )
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0:
            return None
        return cpb.GetStatusResponse.FromString(base64.b64decode(done.stdout.strip()))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def child_of(self, pid: int) -> str:
        for name in MEMBERS:
            facts = read_json(self.state / f"{name}.ready.json")
            if facts and facts.get("pid") == pid:
                return name
        raise AssertionError(f"no child with pid {pid}")

    def leasing_worker(self):
        """A live worker process holding a lease early in its shard."""
        status = self.status()
        return self.pick_holder(status) if status is not None else None

    def frozen_holder(self):
        """A leasing worker, stopped while it still holds its lease (see support.frozen_lease_holder)."""
        return frozen_lease_holder(self.status, self.pick_holder)

    def pick_holder(self, status):
        holders = [
            m for m in status.members
            if m.role == common_pb2.ROLE_WORKER and m.alive and m.has_lease
            and m.lease.offset < (m.lease.end - m.lease.start) // 2
            and "lepton worker" in cmdline(m.pid)
        ]
        return self.rng.choice(holders) if holders else None

    def ready(self, name: str) -> dict:
        return wait_until(lambda: read_json(self.state / f"{name}.ready.json"), 120, name)


def kill_worker(c: Cluster) -> None:
    victim = wait_until(c.frozen_holder, 60, "a worker holding a lease")
    os.kill(victim.pid, signal.SIGKILL)
    c.notes["victim"] = victim.member.member_id


def kill_ps(c: Cluster) -> None:
    name = c.rng.choice(["ps-0", "ps-1"])
    pid = c.ready(name)["pid"]
    assert "lepton ps" in cmdline(pid)
    os.kill(pid, signal.SIGKILL)


def kill_coordinator(c: Cluster) -> None:
    pid = c.ready("coordinator")["pid"]
    assert "lepton coordinator" in cmdline(pid)
    os.kill(pid, signal.SIGKILL)


def zombie_worker(c: Cluster) -> None:
    """SIGSTOP past the heartbeat timeout, wait until it is declared dead, SIGCONT."""
    victim = wait_until(c.frozen_holder, 60, "a worker holding a lease")
    try:
        def declared_dead():
            s = c.status()
            return s is not None and any(
                m.member.member_id == victim.member.member_id and not m.alive for m in s.members
            )

        wait_until(declared_dead, 60, "the paused worker to be declared dead")
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    c.notes["frozen"] = c.child_of(victim.pid)


def short_pause(c: Cluster) -> None:
    """SIGSTOP for a third of the heartbeat timeout: must not cause a reassignment."""
    victim = wait_until(c.leasing_worker, 60, "a worker holding a lease")
    c.notes["frozen"] = c.child_of(victim.pid)
    os.kill(victim.pid, signal.SIGSTOP)
    time.sleep(1.0)  # the fault itself: a 1 s pause against a 3 s timeout (not synchronisation)
    os.kill(victim.pid, signal.SIGCONT)


def sigterm_worker(c: Cluster) -> None:
    victim = wait_until(c.leasing_worker, 60, "a worker holding a lease")
    os.kill(victim.pid, signal.SIGTERM)


def join_worker(c: Cluster) -> None:
    c.processes.start("extra-worker", lepton_argv("worker", "--coordinator", c.client.address))
    c.notes["joined"] = True


def repeated_worker_kills(c: Cluster) -> None:
    for i in range(3):
        victim = wait_until(c.frozen_holder, 90, f"a worker holding a lease (kill {i + 1})")
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(lambda v=victim: v.pid not in tagged_pids(c.processes.tag), 30, "the victim to exit")


def partition_worker(c: Cluster) -> None:
    """Cuts a leasing worker off the network until it is declared dead, then heals the network."""
    assert c.fabric is not None
    victim = wait_until(c.leasing_worker, 60, "a worker holding a lease")
    name = c.child_of(victim.pid)
    c.fabric.partition(name)
    try:
        def declared_dead():
            s = c.status()
            return s is not None and any(
                m.member.member_id == victim.member.member_id and not m.alive for m in s.members
            )

        wait_until(declared_dead, 60, "the cut-off worker to be declared dead", interval_s=0.5)
    finally:
        c.fabric.heal(name)
    c.notes["partitioned"] = name


def partition_ps(c: Cluster) -> None:
    """Cuts a parameter server off until the coordinator declares it dead, then heals."""
    assert c.fabric is not None
    name = c.rng.choice(["ps-0", "ps-1"])
    member_id = c.ready(name)["member_id"]
    c.fabric.partition(name)
    try:
        def declared_dead():
            s = c.status()
            return s is not None and any(m.member.member_id == member_id and not m.alive for m in s.members)

        wait_until(declared_dead, 60, "the cut-off parameter server to be declared dead", interval_s=0.5)
    finally:
        c.fabric.heal(name)
    c.notes["partitioned"] = name


def expect_dead_and_reassigned(report: dict) -> list[str]:
    problems = []
    if report["members_declared_dead"] < 1:
        problems.append("no member declared dead")
    if report["reassignments"] < 1:
        problems.append("no reassignment")
    return problems


def expect_nothing_reassigned(report: dict) -> list[str]:
    if report["reassignments"] or report["members_declared_dead"]:
        return [f"reassignments {report['reassignments']}, dead {report['members_declared_dead']}"]
    return []


def expect_zombie_fenced(report: dict) -> list[str]:
    problems = expect_dead_and_reassigned(report)
    if report["stale_requests_rejected"] < 1:
        problems.append("no request of the fenced incarnation was rejected")
    if any(name.startswith("worker") for name in report.get("restarts", {})):
        problems.append("the zombie crashed instead of re-registering")
    return problems


def expect_partitioned_worker_fenced(report: dict) -> list[str]:
    problems = expect_dead_and_reassigned(report)
    if any(name.startswith("worker") for name in report.get("restarts", {})):
        problems.append("the cut-off worker crashed instead of re-registering")
    return problems


def expect_ps_back(report: dict) -> list[str]:
    return [] if report["ps_restarts"] >= 1 else ["no parameter-server restart"]


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Callable[[Cluster], None]
    expect: Callable[[dict], list[str]]
    network: bool = False  # runs the cluster in network namespaces


FAULTS = [
    Fault("worker-sigkill", kill_worker, expect_dead_and_reassigned),
    Fault("ps-sigkill", kill_ps, expect_ps_back),
    Fault("coordinator-sigkill", kill_coordinator, lambda r: [] if r["coordinator_restarts"] == 1 else ["no restart"]),
    Fault("worker-zombie", zombie_worker, expect_zombie_fenced),
    Fault("worker-short-pause", short_pause, expect_nothing_reassigned),
    Fault(
        "worker-sigterm", sigterm_worker, lambda r: [] if r["members_declared_dead"] == 0 else ["a leave was a death"]
    ),
    Fault("worker-joins", join_worker, lambda r: []),
    Fault("worker-sigkill-x3", repeated_worker_kills, expect_dead_and_reassigned),
    Fault("worker-partition", partition_worker, expect_partitioned_worker_fenced, network=True),
    Fault("ps-partition", partition_ps, expect_ps_back, network=True),
]


def run_cluster(
    tmp_path: Path, tag: str, fault: Fault | None, job: tuple[str, ...] = CI_JOB
) -> tuple[dict, dict, list[int]]:
    processes = Processes(tmp_path)
    state = tmp_path / "state"
    report_path = tmp_path / "report.json"
    notes: dict = {}
    fabric = None
    try:
        argv = lepton_argv("up", "--report", str(report_path), "--state-dir", str(state), *job)
        if fault is not None and fault.network:
            fabric = netns.Fabric(MEMBERS)
            processes.extra_env["LEPTON_UP_PLACEMENT"] = str(fabric.placement_file(tmp_path / "placement.json"))
            argv = fabric.in_hub(argv)
        up = processes.start("up", argv)
        address = wait_until(lambda: read_json(state / "coordinator.ready.json"), 120, "the coordinator")["address"]
        cluster = Cluster(processes, state, address, random.Random(f"{SEED}-{tag}"), notes, fabric)
        try:
            wait_until(lambda: (s := cluster.status()) is not None and s.epoch >= 1, 180, "epoch 1")
            if fault is not None:
                fault.inject(cluster)
        finally:
            cluster.close()
        up.wait(timeout=RUN_TIMEOUT_S)
        report = read_json(report_path)
        assert report is not None, processes.log("up")
        leaked = tagged_pids(processes.tag)
        return report, notes, leaked
    finally:
        processes.close()
        if fabric is not None:
            fabric.close()


def chaos_job(config: pytest.Config) -> tuple[str, ...]:
    """The job of every chaos run: the CI subset's or the full matrix's, in ``--chaos-mode``."""
    job = FULL_JOB if config.getoption("--chaos-full") else CI_JOB
    mode = config.getoption("--chaos-mode")
    return (*job, "--mode", mode, *(("--staleness", "2") if mode == "ssp" else ()))


@pytest.fixture(scope="module")
def baseline_accuracy(tmp_path_factory, request) -> float | None:
    """The lowest accuracy of three fault-free runs (None outside the full matrix)."""
    if not request.config.getoption("--chaos-full"):
        return None
    accuracies = []
    for i in range(BASELINE_RUNS):
        report, _, _ = run_cluster(
            tmp_path_factory.mktemp("baseline"), f"baseline-{i}", None, chaos_job(request.config)
        )
        assert report["status"] == "succeeded"
        accuracies.append(report["test_accuracy"])
        TABLE.append({"fault": f"(none: baseline {i + 1})", "ok": True, "accuracy": report["test_accuracy"],
                      "hung": hung_requests(report, None), "wall": report["wall_seconds"], "problems": []})
    return min(accuracies)


def hung_requests(report: dict, frozen: str | None) -> int:
    """Requests that outlived their deadline, from every process the launcher could scrape; the
    client side of the child a fault froze is left out (its own clock ran on while stopped)."""
    past = report.get("requests_past_deadline", {})
    total = sum(v.get("server", 0) for v in past.values())
    total += sum(v.get("client", 0) for name, v in past.items() if name != frozen)
    return int(total)


def guard_cancelled(report: dict) -> int:
    """Streams the client-side deadline guard had to cut 0.5 s past their deadline (not hangs:
    within the slack; a sign the transport did not end them itself)."""
    return int(sum(v.get("guard_cancelled", 0) for v in report.get("requests_past_deadline", {}).values()))


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_the_job_survives(fault, tmp_path, request, baseline_accuracy):
    full = request.config.getoption("--chaos-full")
    if not full and fault.name not in CI_SUBSET:
        pytest.skip("in the full chaos matrix only (--chaos-full)")
    if fault.network and (why := netns.available()) is not None:
        pytest.skip(f"network partitions need namespaces: {why}")
    report, notes, leaked = run_cluster(tmp_path, fault.name, fault, chaos_job(request.config))
    epochs, shards = report["epochs"], report["shards_per_epoch"]
    problems = list(fault.expect(report)) if report["status"] == "succeeded" else []
    if report["status"] != "succeeded":
        problems.append(f"job {report['status']}: {report.get('failure')}")
    if report.get("mode") != request.config.getoption("--chaos-mode"):
        problems.append(f"the job ran in mode {report.get('mode')}, not {request.config.getoption('--chaos-mode')}")
    if report.get("shard_completions") != epochs * shards:
        problems.append(f"{report.get('shard_completions')} completions, expected {epochs * shards}")
    if report.get("observed_completions_per_epoch") != [shards] * epochs:
        problems.append(f"observed per epoch {report.get('observed_completions_per_epoch')}")
    if report.get("observed_shards_completed_more_than_once"):
        problems.append("a shard completed twice")
    if leaked:
        problems.append(f"leaked processes {[cmdline(p) for p in leaked]}")
    if any(code is None for code in report["exit_codes"].values()):
        problems.append("a child was not reaped")
    if "requests_past_deadline" not in report:
        problems.append("the report does not count requests past their deadline")
    hung = hung_requests(report, notes.get("frozen"))
    if hung:
        problems.append(f"{hung} requests outlived their deadline: {report['requests_past_deadline']}")
    accuracy = report.get("test_accuracy") or 0.0
    floor = (baseline_accuracy - 0.01) if baseline_accuracy is not None else CI_ACCURACY_FLOOR
    if accuracy < floor:
        problems.append(f"accuracy {accuracy:.4f} below {floor:.4f}")
    TABLE.append(
        {
            "fault": fault.name,
            "ok": not problems,
            "accuracy": accuracy,
            "done": report.get("shard_completions"),
            "dead": report.get("members_declared_dead"),
            "moved": report.get("reassignments"),
            "fenced": report.get("stale_requests_rejected"),
            "restarts": report.get("restarts"),
            "hung": hung,
            "cut": guard_cancelled(report),
            "wall": report.get("wall_seconds"),
            "problems": problems,
        }
    )
    assert not problems, problems
