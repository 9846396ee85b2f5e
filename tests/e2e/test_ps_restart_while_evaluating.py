"""A parameter server killed and restarted while the job evaluates: the one worker follows it to
its new address and the job succeeds (hand-started cluster, no supervisor)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lepton.clients import CoordinatorClient
from lepton.v1 import coordinator_pb2 as cpb
from support import lepton_argv, read_json, wait_until

pytestmark = pytest.mark.e2e

# Two shards of one batch each: two pushes. The worker's --step-delay holds it that long before
# each push and before it pulls to evaluate: the window in which the test kills ps-0.
DELAY_S = 3.0


def test_a_parameter_server_killed_and_restarted_while_evaluating_is_followed(processes, tmp_path):
    coordinator = processes.start(
        "coordinator",
        lepton_argv(
            "coordinator", "--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "c.json"),
            "--parameter-servers", "2", "--epochs", "1", "--shards", "2", "--batch-size", "1024",
            "--checkpoint-every", "1", "--heartbeat-timeout", "3", "--log-format", "json",
        ),
    )
    address = wait_until(lambda: read_json(tmp_path / "c.json"), 60, "the coordinator")["address"]

    def server(i: int):
        return processes.start(
            f"ps-{i}",
            lepton_argv("ps", "--coordinator", address, "--listen", "127.0.0.1:0", "--id", f"ps-{i}",
                        "--state-dir", str(tmp_path / f"ps-{i}"), "--log-format", "json"),
        )

    servers = [server(0), server(1)]
    worker = processes.start(
        "worker",
        lepton_argv("worker", "--coordinator", address, "--step-delay", str(DELAY_S), "--log-format", "json"),
    )

    client = CoordinatorClient(address)
    try:
        for event in client.watch(timeout_s=120):  # the stream replays, then follows, the job's events
            if event.kind == cpb.EVENT_KIND_JOB_STATE_CHANGED and event.job_state == cpb.JOB_STATE_EVALUATING:
                break
        os.kill(servers[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        assert servers[0].wait(timeout=10) == -signal.SIGKILL
        # The evaluator meets the dead server (held by its delay until after the kill), then ps-0
        # comes back under its id, at a new port, from its checkpoint.
        wait_until(
            lambda: "evaluation_pull_retry" in processes.log("worker") or worker.poll() is not None,
            60, "the evaluator's pull to fail",
        )
        assert worker.poll() is None, f"the evaluating worker exited {worker.returncode}"
        restarted = server(0)
        assert worker.wait(timeout=120) == 0
        succeeded_s = time.monotonic() - killed
        final = client.status()
        for proc in (restarted, servers[1]):
            assert proc.wait(timeout=60) == 0
    finally:
        client.close()
    retries = processes.log("worker").count("evaluation_pull_retry")
    print(
        f"ps-0 killed while evaluating: state={final.state} after {succeeded_s:.1f}s "
        f"ps_restarts={final.ps_restarts} rolled_back={final.steps_rolled_back} "
        f"completions={final.shard_completions} evaluation_pull_retries={retries}"
    )
    assert final.state == cpb.JOB_STATE_SUCCEEDED
    assert final.has_evaluation and final.evaluation.samples > 0
    assert final.ps_restarts == 1 and final.shard_completions == 2
    workers = [m for m in final.members if m.member.member_id.startswith("worker")]
    assert [m.member.incarnation for m in workers] == [1]  # the worker never left or re-registered

    coordinator.terminate()
    assert coordinator.wait(timeout=30) == 0
