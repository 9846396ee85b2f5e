"""``lepton scale`` against a running ``lepton up``: workers join and leave a job in flight, as real
processes, and the job still completes every shard exactly once."""

from __future__ import annotations

import subprocess
import time

import pytest

from lepton.clients import CoordinatorClient
from lepton.errors import LeptonError
from lepton.v1 import common_pb2
from support import lepton_argv, read_json, tagged_pids, wait_until

pytestmark = pytest.mark.e2e
EPOCHS = 30
RUN_TIMEOUT_S = 300


def scale(processes, state, workers: int) -> tuple[subprocess.CompletedProcess, float]:
    sent = time.monotonic()
    done = subprocess.run(
        lepton_argv("scale", "--state-dir", str(state), "--workers", str(workers)),
        capture_output=True, text=True, timeout=60, env=processes.env(),
    )
    return done, time.monotonic() - sent


def test_a_running_lepton_up_grows_to_four_workers_and_shrinks_to_one_without_losing_a_shard(processes, tmp_path):
    state = tmp_path / "state"
    report_path = tmp_path / "report.json"
    began = time.monotonic()
    up = processes.start(
        "up",
        lepton_argv("up", "--workers", "2", "--max-workers", "4", "--epochs", str(EPOCHS),
                    "--state-dir", str(state), "--report", str(report_path)),
    )
    facts = wait_until(lambda: read_json(state / "up.json"), 120, "lepton up to take scale requests")
    assert facts["workers"] == 2 and facts["max_workers"] == 4
    ready_s = time.monotonic() - began
    client = CoordinatorClient(facts["coordinator"])
    try:

        def workers_alive():
            try:
                members = client.status().members
            except LeptonError:
                return None
            return [m for m in members if m.role == common_pb2.ROLE_WORKER and m.alive]

        up_to_four, took_up = scale(processes, state, 4)
        assert up_to_four.returncode == 0, up_to_four.stderr
        assert up_to_four.stdout.strip() == "workers: 2 -> 4"
        joiners = {
            wait_until(lambda i=i: read_json(state / f"worker-{i}.ready.json"), 60, f"worker-{i} to start")["pid"]
            for i in (2, 3)
        }
        leased: set[int] = set()

        def four_alive_and_every_joiner_leased():
            alive = workers_alive() or []
            leased.update(m.pid for m in alive if m.has_lease and m.pid in joiners)
            return len(alive) == 4 and leased == joiners

        # Every joiner holds a lease before the shrink, so none is stopped while it is still loading.
        wait_until(four_alive_and_every_joiner_leased, 90, "4 live workers, each new one holding a lease")
        grown_s = time.monotonic() - began

        down_to_one, took_down = scale(processes, state, 1)
        assert down_to_one.returncode == 0, down_to_one.stderr
        assert down_to_one.stdout.strip() == "workers: 4 -> 1"
        shrink_sent = time.monotonic()
        wait_until(lambda: len(workers_alive() or [None, None]) == 1, 30, "1 live worker")
        shrunk_s = time.monotonic() - shrink_sent
        status = client.status()
        assert status.members_declared_dead == 0  # every departure was graceful
        epoch_at_shrink = status.epoch
    finally:
        client.close()
    print(
        f"up.json after {ready_s:.1f}s; scale 2->4 acknowledged in {took_up:.2f}s; "
        f"4 live workers, all leasing, {grown_s:.1f}s after start; "
        f"scale 4->1 acknowledged in {took_down:.2f}s; 1 live worker {shrunk_s:.2f}s after the request "
        f"(epoch {epoch_at_shrink + 1}/{EPOCHS})"
    )

    up.wait(timeout=RUN_TIMEOUT_S)
    report = read_json(report_path)
    assert report is not None, processes.log("up")
    assert up.returncode == 0, processes.log("up")
    assert report["status"] == "succeeded"
    assert report["shard_completions"] == EPOCHS * report["shards_per_epoch"]
    assert report["observed_completions_per_epoch"] == [report["shards_per_epoch"]] * EPOCHS
    assert report["observed_shards_completed_more_than_once"] == 0
    assert report["members_declared_dead"] == 0
    assert report["max_workers"] == 4 and report["workers"] == 2 and report["workers_at_end"] == 1
    events = [(e["from"], e["to"], e["started"], e["stopped"]) for e in report["scale_events"]]
    assert events == [
        (2, 4, ["worker-2", "worker-3"], []),
        (4, 1, [], ["worker-3", "worker-2", "worker-1"]),
    ]
    assert report["exit_codes"] == {name: 0 for name in report["exit_codes"]}, report["exit_codes"]
    assert {"worker-1", "worker-2", "worker-3"} <= set(report["exit_codes"])
    assert report["restarts"] == {}  # scaled-down workers were not restarted
    assert tagged_pids(processes.tag) == []

    gone, _ = scale(processes, state, 2)
    assert gone.returncode == 2 and "no running lepton up" in gone.stderr
    print(f"test wall {time.monotonic() - began:.1f}s, job {report['wall_seconds']:.1f}s")
