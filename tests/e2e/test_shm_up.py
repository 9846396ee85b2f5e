"""``lepton up`` over shared memory: the co-located workers and servers move tensors through
/dev/shm, a parameter server SIGKILLed mid-job is restarted and sweeps what it left, the job
succeeds and /dev/shm holds nothing of it afterwards."""

from __future__ import annotations

import os
import secrets
import signal

import pytest

from lepton import shm
from lepton.clients import CoordinatorClient
from support import lepton_argv, read_json, tagged_pids, wait_until

pytestmark = pytest.mark.e2e
RUN_TIMEOUT_S = 300


def test_a_job_over_shared_memory_survives_a_killed_server_and_leaves_dev_shm_clean(processes, tmp_path):
    state = tmp_path / "state"
    report_path = tmp_path / "report.json"
    up = processes.start(
        "up", lepton_argv("up", "--report", str(report_path), "--state-dir", str(state), "--epochs", "8"),
    )
    ready = wait_until(lambda: read_json(state / "coordinator.ready.json"), 120, "the coordinator")
    pids = {n: wait_until(lambda n=n: read_json(state / f"{n}.ready.json"), 120, n)["pid"] for n in ("ps-0", "ps-1")}
    client = CoordinatorClient(ready["address"])
    try:
        wait_until(lambda: client.status().epoch >= 2, 180, "epoch 2")
    finally:
        client.close()
    killed = pids["ps-1"]
    # What a server killed between OpenSharedMemory and its session's first step leaves behind.
    planted = shm.SHM_DIR / f"{shm.PREFIX}{killed}-{secrets.token_hex(8)}-g"
    planted.write_bytes(bytes(128))
    os.kill(killed, signal.SIGKILL)

    up.wait(timeout=RUN_TIMEOUT_S)
    report = read_json(report_path)
    assert report is not None, processes.log("up")
    assert up.returncode == 0, processes.log("up")
    assert report["status"] == "succeeded" and report["restarts"].get("ps-1", 0) >= 1
    assert tagged_pids(processes.tag) == []
    logs = {p.name: p.read_text() for p in (state / "logs").glob("*.log")}
    workers = [text for name, text in logs.items() if name.startswith("worker-")]
    assert workers and all("shm_session_opened" in text for text in workers), "a worker never used shared memory"
    assert not any("shm_unavailable_using_grpc" in text for text in workers)
    assert not planted.exists(), "the restarted server did not sweep the killed one's segment"
    restarted = read_json(state / "ps-1.ready.json")["pid"]
    left = [n for pid in {*pids.values(), restarted} for n in shm.ours(pid=pid)]
    assert left == []
