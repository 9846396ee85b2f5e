"""The three roles started by hand as separate processes form a cluster that completes a job."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lepton.clients import CoordinatorClient
from support import lepton_argv, read_json, wait_until

pytestmark = pytest.mark.e2e


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return reply.status


def test_roles_started_by_hand_complete_a_job_and_answer_health_checks(processes, tmp_path):
    coordinator = processes.start(
        "coordinator",
        lepton_argv(
            "coordinator", "--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "c.json"),
            "--parameter-servers", "2", "--epochs", "4", "--shards", "8", "--log-format", "json",
        ),
    )
    address = wait_until(lambda: read_json(tmp_path / "c.json"), 60, "the coordinator")["address"]
    servers = [
        processes.start(
            f"ps-{i}",
            lepton_argv(
                "ps", "--coordinator", address, "--listen", "127.0.0.1:0",
                "--ready-file", str(tmp_path / f"ps-{i}.json"),
            ),
        )
        for i in range(2)
    ]
    ps_addresses = [
        wait_until(lambda i=i: read_json(tmp_path / f"ps-{i}.json"), 60, f"ps-{i}")["address"] for i in range(2)
    ]
    workers = [processes.start(f"worker-{i}", lepton_argv("worker", "--coordinator", address)) for i in range(2)]

    client = CoordinatorClient(address)
    try:
        wait_until(lambda: sum(m.alive for m in client.status().members) == 4, 60, "four live members")
        shown = subprocess.run(
            lepton_argv("status", "--coordinator", address, "--json"),
            capture_output=True, text=True, timeout=60, check=True,
        )
        status = json.loads(shown.stdout)
        roles = sorted((m["role"], m["member"]["incarnation"]) for m in status["members"])
        assert roles == [("ROLE_PARAMETER_SERVER", 1)] * 2 + [("ROLE_WORKER", 1)] * 2
        assert all(m["last_heartbeat_age_s"] < 3.0 for m in status["members"])
        assert status["job"]["epochs"] == 4 and status["job"]["shards_per_epoch"] == 8

        serving = health_pb2.HealthCheckResponse.SERVING
        assert health_status(address) == serving
        assert health_status(address, "lepton.v1.Coordinator") == serving
        for ps in ps_addresses:
            assert health_status(ps) == serving
            assert health_status(ps, "lepton.v1.ParameterServer") == serving

        for proc in workers + servers:
            proc.wait(timeout=240)
        final = client.status()
    finally:
        client.close()
    assert [p.returncode for p in workers + servers] == [0, 0, 0, 0]
    assert final.state == 5  # JOB_STATE_SUCCEEDED
    assert final.shard_completions == 4 * 8
    assert final.has_evaluation and final.evaluation.accuracy > 0.9

    human = subprocess.run(
        lepton_argv("status", "--coordinator", address), capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "succeeded" in human and "worker-0" in human and "ps-1" in human

    coordinator.terminate()
    assert coordinator.wait(timeout=30) == 0
