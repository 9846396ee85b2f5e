"""A hand-started cluster (no supervisor) outlives its coordinator paused past the heartbeat timeout."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from lepton.clients import CoordinatorClient
from support import lepton_argv, read_json, wait_until

pytestmark = pytest.mark.e2e

TIMEOUT_S = 3.0
EPOCHS, SHARDS = 6, 8
SUCCEEDED = 5  # JOB_STATE_SUCCEEDED
TRAINING = 3  # JOB_STATE_TRAINING
LOAD_S = 240.0  # the busy loops' bound: longer than a loaded run, killed with the cluster anyway


def start_cluster(processes, tmp_path, workers: int, epochs: int = EPOCHS):
    """A hand-started cluster (no supervisor): the coordinator, two parameter servers and
    ``workers`` workers, all logging JSON. Returns (coordinator, address, servers, workers)."""
    coordinator = processes.start(
        "coordinator",
        lepton_argv(
            "coordinator", "--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "c.json"),
            "--parameter-servers", "2", "--epochs", str(epochs), "--shards", str(SHARDS),
            "--heartbeat-timeout", str(TIMEOUT_S), "--log-format", "json",
        ),
    )
    address = wait_until(lambda: read_json(tmp_path / "c.json"), 60, "the coordinator")["address"]
    servers = [
        processes.start(
            f"ps-{i}", lepton_argv("ps", "--coordinator", address, "--listen", "127.0.0.1:0", "--log-format", "json")
        )
        for i in range(2)
    ]
    started = [
        processes.start(f"worker-{i}", lepton_argv("worker", "--coordinator", address)) for i in range(workers)
    ]
    return coordinator, address, servers, started


def busy_loops(processes, count: int, seconds: float) -> list:
    """``count`` unrelated processes that spin a core each for at most ``seconds``."""
    spin = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    return [processes.start(f"load-{i}", [sys.executable, "-c", spin]) for i in range(count)]


@pytest.mark.parametrize("load", [False, True], ids=["idle", "cores-busy"])
def test_a_coordinator_paused_for_three_heartbeat_timeouts_loses_nobody(processes, tmp_path, load):
    """With ``load``, both cores spin in unrelated processes for the whole run: a starved machine
    must not pass for dead members either."""
    loops = busy_loops(processes, 2, LOAD_S) if load else []
    epochs = EPOCHS // 2 if load else EPOCHS  # as long a run in seconds, about
    coordinator, address, servers, workers = start_cluster(processes, tmp_path, workers=3, epochs=epochs)
    members = servers + workers

    client = CoordinatorClient(address)
    try:
        before = wait_until(
            lambda: (s := client.status()).state == TRAINING and s.shard_completions >= 1 and s,
            120, "training under way",
        )
        os.kill(coordinator.pid, signal.SIGSTOP)
        try:
            time.sleep(3 * TIMEOUT_S)  # the deliberate pause, not a synchronisation
        finally:
            os.kill(coordinator.pid, signal.SIGCONT)
        wait_until(
            lambda: client.status().shard_completions > before.shard_completions,
            60, "training after the pause",
        )
        assert [p.poll() for p in members] == [None] * len(members)  # nobody left during or after it

        for proc in members:
            proc.wait(timeout=240)
        final = client.status()
    finally:
        client.close()
    codes = [p.returncode for p in members]
    coordinator_log = processes.log("coordinator")
    print(
        f"pause {3 * TIMEOUT_S:g}s at {before.shard_completions} completions: state={final.state} "
        f"completions={final.shard_completions} dead={final.members_declared_dead} "
        f"duplicates={final.duplicate_completions_rejected} reassignments={final.reassignments} "
        f"ps_restarts={final.ps_restarts} codes={codes} "
        f"stalls_logged={coordinator_log.count('coordinator_stall_detected')} "
        f"load_running_at_end={[p.poll() is None for p in loops]}"
    )
    assert all(p.poll() is None for p in loops)  # the load lasted the whole run
    assert codes == [0] * len(members)
    assert final.state == SUCCEEDED
    assert final.shard_completions == epochs * SHARDS  # every shard of every epoch, once
    assert final.duplicate_completions_rejected == 0
    assert final.members_declared_dead == 0
    assert final.ps_restarts == 0
    assert sorted(m.member.incarnation for m in final.members) == [1] * len(members)
    assert "coordinator_stall_detected" in coordinator_log

    coordinator.terminate()
    assert coordinator.wait(timeout=30) == 0


def test_a_parameter_server_declared_dead_while_alive_rejoins_with_its_state(processes, tmp_path):
    """The fallback when a fence does happen: a server paused past the timeout is declared dead;
    continued, it re-registers under its id and serves its live parameters (no supervisor)."""
    coordinator, address, servers, workers = start_cluster(processes, tmp_path, workers=2)
    members = servers + workers

    client = CoordinatorClient(address)
    try:
        status = wait_until(
            lambda: (s := client.status()).state == TRAINING and s.shard_completions >= 1 and s,
            120, "training under way",
        )
        victim = next(m for m in status.members if m.member.member_id == "ps-0")
        victim_log = next(f"ps-{i}" for i, p in enumerate(servers) if p.pid == victim.pid)  # started as
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            wait_until(
                lambda: client.status().members_declared_dead >= 1, 60, "ps-0 declared dead", interval_s=0.2
            )
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        wait_until(
            lambda: any(
                (m.member.member_id, m.member.incarnation, m.alive) == ("ps-0", 2, True)
                for m in client.status().members
            ),
            60, "ps-0 back under incarnation 2",
        )
        for proc in members:
            proc.wait(timeout=240)
        final = client.status()
    finally:
        client.close()
    codes = [p.returncode for p in members]
    kept = '"kept_state": true' in processes.log(victim_log)
    print(
        f"ps-0 paused until declared dead: state={final.state} completions={final.shard_completions} "
        f"dead={final.members_declared_dead} ps_restarts={final.ps_restarts} "
        f"rolled_back={final.steps_rolled_back} codes={codes} kept_state={kept}"
    )
    assert codes == [0] * len(members)
    assert final.state == SUCCEEDED
    assert final.shard_completions == EPOCHS * SHARDS
    assert final.duplicate_completions_rejected == 0
    assert final.ps_restarts == 1
    assert final.steps_rolled_back == 0  # it kept its live parameters
    assert kept

    coordinator.terminate()
    assert coordinator.wait(timeout=30) == 0
