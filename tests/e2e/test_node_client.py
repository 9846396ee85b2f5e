"""A client in another language: examples/node/client.js (grpc-js, protos loaded at run time)
watches, registers as a worker, waits for the job by retrying UNAVAILABLE as the protos say,
pulls, leases a shard, pushes, pulls again and completes the shard against a real in-process
cluster.

The client starts before the parameter server exists, so its GetLayout is refused with UNAVAILABLE
and a retry delay first. The cluster has no Python workers, so the Node client's push is the only
update: the server's version goes 0 -> 1 and the pulled tensor moves by exactly one Adam step,
which this test recomputes independently with torch."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
import structlog
import torch
from integration.conftest import InProcessCluster, stop_cluster

from coordinator.main import serve as serve_coordinator
from lepton.config import JobSpec
from lepton.coordinator_client import CoordinatorClient
from lepton.v1 import parameter_server_pb2 as ps_pb
from lepton.v1 import parameter_server_pb2_grpc as ps_grpc
from lepton.workloads import build_model, load_workload
from ps_server.main import serve as serve_ps
from support import read_json, wait_until

pytestmark = pytest.mark.e2e

NODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")


def gradient_like(t: torch.Tensor) -> torch.Tensor:
    """The client's synthetic gradient: +0.5 at even flat indices, -0.25 at odd ones."""
    flat = torch.where(torch.arange(t.numel()) % 2 == 0, 0.5, -0.25).to(t.dtype)
    return flat.reshape(t.shape)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if NODE is None or NPM is None:
        pytest.skip("node and npm must be on PATH to run the Node.js client example")
    modules = NODE_DIR / "node_modules"
    if not (modules / "@grpc" / "grpc-js").is_dir() or not (modules / "@grpc" / "proto-loader").is_dir():
        result = subprocess.run(
            [NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    return modules


def start_coordinator(tmp_path, spec: JobSpec) -> tuple[str, threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(
        target=serve_coordinator, args=(spec, "127.0.0.1:0", stop),
        kwargs={"ready_file": str(tmp_path / "c.json"), "grace_s": 0.5}, daemon=True,
    )
    thread.start()
    return wait_until(lambda: read_json(tmp_path / "c.json"), 60, "the coordinator")["address"], stop, thread


def start_ps(tmp_path, coordinator: str) -> tuple[str, threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(
        target=serve_ps, args=(coordinator, "127.0.0.1:0", stop),
        kwargs={"ready_file": str(tmp_path / "ps0.json"), "grace_s": 0.5}, daemon=True,
    )
    thread.start()
    return wait_until(lambda: read_json(tmp_path / "ps0.json"), 60, "the parameter server")["address"], stop, thread


def test_node_client_waits_by_retrying_unavailable_then_pulls_pushes_and_completes(node_modules, tmp_path):
    spec = JobSpec(
        epochs=1, shards_per_epoch=4, parameter_servers=1, heartbeat_interval_s=0.2, heartbeat_timeout_s=600.0
    )
    assert spec.optimizer == "adam" and spec.mode == "async" and not spec.optimizer_kwargs
    coordinator, coordinator_stop, coordinator_thread = start_coordinator(tmp_path, spec)
    cluster = InProcessCluster(spec, coordinator, [], [coordinator_stop], [coordinator_thread], [None])
    node = None
    try:
        with structlog.testing.capture_logs() as logs:
            node = subprocess.Popen(
                [NODE, str(NODE_DIR / "client.js"), "--coordinator", coordinator, "--watch-seconds", "0.5",
                 "--timeout", "60"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            # No parameter server yet: the client's GetLayout is refused as "not ready yet".
            wait_until(
                lambda: any(e.get("event") == "rpc_rejected" and e.get("method", "").endswith("/GetLayout")
                            and e.get("code") == "UNAVAILABLE" for e in list(logs)),
                60, "the Node client's GetLayout to be answered UNAVAILABLE",
            )
        server_address, ps_stop, ps_thread = start_ps(tmp_path, coordinator)
        cluster = InProcessCluster(
            spec, coordinator, [server_address], [coordinator_stop, ps_stop], [coordinator_thread, ps_thread],
            [None, None],
        )
        stdout, stderr = node.communicate(timeout=90)
        assert node.returncode == 0, f"node client failed ({node.returncode}):\n{stdout}\n{stderr}"
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        assert lines, f"no JSON summary on stdout:\n{stdout}\n{stderr}"
        summary = json.loads(lines[-1])

        with grpc.insecure_channel(server_address) as channel:
            server = ps_grpc.ParameterServerStub(channel).GetServerStatus(
                ps_pb.GetServerStatusRequest(), timeout=10
            )
        client = CoordinatorClient(coordinator)
        try:
            status = client.status()
        finally:
            client.close()
    finally:
        if node is not None and node.poll() is None:
            node.kill()
            node.communicate(timeout=10)
        stop_cluster(cluster)

    # It waited as the protos say: UNAVAILABLE with lepton-retry-after-ms = heartbeat_interval_s / 2.
    assert summary["unavailable_retries"]["GetLayout"] >= 1
    assert summary["retry_after_ms"]["GetLayout"] == 100
    # Its shard counts, and its report without a loss left recent_loss alone.
    assert summary["completed"]["shard_completions"] == "1" and status.shard_completions == 1
    assert math.isnan(status.recent_loss)

    assert summary["ok"] is True and summary["longs"] == "String"
    assert summary["job_state"] == "JOB_STATE_TRAINING"
    assert summary["events_received"] > 0
    assert "EVENT_KIND_MEMBER_REGISTERED" in summary["event_kinds"]
    assert summary["own_registration_seen"] is True
    assert summary["deregistered"] is True
    assert summary["member"]["member_id"] and int(summary["member"]["incarnation"]) == 1

    # int64 fields arrive as decimal strings (longs: String).
    assert summary["version_before"] == "0"
    assert summary["version_after"] == "1"
    assert summary["push"] == {
        "outcome": "PUSH_OUTCOME_APPLIED", "version": "1", "staleness": "0",
        "tensors": summary["server"]["tensors"], "bytes": summary["push"]["bytes"],
        "messages": summary["push"]["messages"],
    }
    assert server.version == 1 and server.updates_applied == 1 and server.pushes_rejected == 0

    # The client decoded the bytes as the coordinator's initial parameters, and what it pulled
    # after its push is exactly one torch Adam step with its gradient.
    model = build_model(spec.model, load_workload(spec.dataset, spec.seed), spec.seed)
    params = dict(model.named_parameters())
    name = summary["tensor"]["name"]
    initial = params[name].detach().clone()
    assert summary["tensor"]["shape"] == list(initial.shape)
    assert summary["tensor"]["dtype"] == "DTYPE_FLOAT32"
    assert summary["numel"] == initial.numel()
    assert summary["push"]["tensors"] == len(params)  # the only server holds every tensor
    assert summary["push"]["bytes"] == sum(p.numel() * 4 for p in params.values())
    head = initial.reshape(-1)[:4].tolist()
    assert summary["values_before_head"] == head  # float32 widened exactly in both languages

    p = torch.nn.Parameter(initial.clone())
    optimizer = torch.optim.Adam([p], lr=spec.lr)
    p.grad = gradient_like(p)
    optimizer.step()
    expected_head = p.detach().reshape(-1)[:4].tolist()
    assert summary["values_after_head"] == pytest.approx(expected_head, abs=1e-6)
    assert summary["changed_elements"] == initial.numel()
    assert summary["max_abs_delta"] == pytest.approx(spec.lr, rel=1e-3)
    assert summary["adam_first_step_checked"] is True
    assert summary["adam_first_step_max_error"] <= 1e-5
