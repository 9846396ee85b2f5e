"""TLS, bearer tokens with roles, audit log, reflection switch and Prometheus metrics, against
real servers on 127.0.0.1:0."""

from __future__ import annotations

import threading
import urllib.request

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lepton.clients import CoordinatorClient, ParameterClient
from lepton.config import JobSpec
from lepton.errors import PermissionDenied, Unauthenticated, Unavailable
from lepton.ops.certs import make_dev_pki
from lepton.process import ServiceOptions
from lepton.security import load_security
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc
from worker.agent import WorkerAgent

from .conftest import start_cluster, stop_cluster

SPEC = JobSpec(epochs=1, shards_per_epoch=4, parameter_servers=1, heartbeat_interval_s=0.2, heartbeat_timeout_s=3.0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_dev_pki(tmp_path_factory.mktemp("pki"), ["localhost", "127.0.0.1"])


def security(pki, role: str | None, server: bool = False):
    return load_security(
        tls_cert=str(pki["cert"]), tls_key=str(pki["key"]), tls_ca=str(pki["ca"]),
        token_file=str(pki[f"{role}-token"]) if role else None,
        auth_file=str(pki["auth"]) if server else None, environ={},
    )


@pytest.fixture
def secure_cluster(tmp_path, pki):
    """A fresh secured cluster per test: a cancelled or finished job stops its servers."""
    cluster = start_cluster(
        tmp_path,
        SPEC,
        coordinator_options=ServiceOptions(security=security(pki, None, server=True), reflection=False),
        ps_options=ServiceOptions(security=security(pki, "ps", server=True)),
    )
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


def test_secured_job_succeeds_with_role_tokens(secure_cluster, pki):
    client = CoordinatorClient(secure_cluster.coordinator, security=security(pki, "worker"))
    agent = WorkerAgent(
        client, threading.Event(), ps_client=lambda a: ParameterClient(a, security=security(pki, "worker"))
    )
    try:
        assert agent.run() == 0
        status = client.status()
    finally:
        client.close()
    assert status.state == cpb.JOB_STATE_SUCCEEDED and status.shard_completions == 4


def test_calls_without_a_token_are_unauthenticated_and_audited(secure_cluster, pki):
    anonymous = CoordinatorClient(secure_cluster.coordinator, security=security(pki, None))
    try:
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(Unauthenticated):
                anonymous.status()
    finally:
        anonymous.close()
    assert any(e.get("outcome") == "UNAUTHENTICATED" and e.get("principal") == "anonymous" for e in logs)
    channel = grpc.secure_channel(secure_cluster.servers[0], security(pki, None).channel_credentials())
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            ppb_grpc.ParameterServerStub(channel).GetServerStatus(ppb.GetServerStatusRequest(), timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_worker_token_may_not_call_an_admin_rpc_but_an_admin_token_may(secure_cluster, pki):
    worker = CoordinatorClient(secure_cluster.coordinator, security=security(pki, "worker"))
    admin = CoordinatorClient(secure_cluster.coordinator, security=security(pki, "admin"))
    try:
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(PermissionDenied, match="admin"):
                worker.cancel("worker tries job control")
            admin.cancel("integration test")
        state = admin.status()
    finally:
        worker.close()
        admin.close()
    audits = [e for e in logs if e.get("event") == "audit"]
    assert {"principal": "worker", "caller_role": "worker", "outcome": "PERMISSION_DENIED"}.items() <= audits[0].items()
    assert {"principal": "admin", "outcome": "OK", "method": "/lepton.v1.Coordinator/CancelJob"}.items() <= audits[
        -1
    ].items()
    assert state.state in (cpb.JOB_STATE_FAILED, cpb.JOB_STATE_SUCCEEDED)


def test_a_plaintext_client_cannot_connect_to_a_tls_server(secure_cluster):
    client = CoordinatorClient(secure_cluster.coordinator, timeout_s=2.0)
    try:
        with pytest.raises(Unavailable):
            client.layout()
    finally:
        client.close()


def test_a_client_without_a_certificate_is_refused_by_mutual_tls(secure_cluster, pki):
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    with grpc.secure_channel(secure_cluster.coordinator, creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def test_health_needs_no_token_and_reflection_can_be_switched_off(secure_cluster, pki):
    creds = security(pki, None).channel_credentials()
    with grpc.secure_channel(secure_cluster.coordinator, creds) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    with grpc.secure_channel(secure_cluster.servers[0], creds) as channel:  # reflection on (default)
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        )
        names = {s.name for s in answer.list_services_response.service}
        assert "lepton.v1.ParameterServer" in names


def scrape(address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_endpoints_show_the_documented_metrics_after_a_run(tmp_path):
    spec = SPEC.replace(epochs=2)
    cluster = start_cluster(
        tmp_path, spec, coordinator_options=ServiceOptions(metrics_port=0), ps_options=ServiceOptions(metrics_port=0)
    )
    client = CoordinatorClient(cluster.coordinator)
    try:
        assert WorkerAgent(client, threading.Event()).run() == 0
        coordinator = scrape(cluster.metrics[0])
        ps = scrape(cluster.metrics[1])
    finally:
        client.close()
        stop_cluster(cluster)
    assert coordinator["lepton_shards_completed_total"] == 8
    assert coordinator["lepton_shards_leased_total"] >= 8
    assert coordinator['lepton_members{alive="true",role="worker"}'] == 1
    assert (
        coordinator['lepton_rpc_server_handled_total{code="OK",method="LeaseShard",service="lepton.v1.Coordinator"}']
        >= 8
    )
    assert (
        coordinator['lepton_rpc_server_handling_seconds_count{method="CompleteShard",service="lepton.v1.Coordinator"}']
        == 8
    )
    for name in (
        "lepton_shards_reassigned_total",
        "lepton_members_declared_dead_total",
        "lepton_stale_requests_rejected_total",
        "lepton_heartbeats_missed_total",
    ):
        assert name in coordinator
    assert ps["lepton_ps_version"] > 0 and ps["lepton_ps_updates_applied_total"] == ps["lepton_ps_version"]
    assert ps["lepton_ps_pushed_bytes_total"] > 0 and ps["lepton_ps_pulled_bytes_total"] > 0
    # The names before Prometheus conventions stay one release as deprecated aliases.
    assert ps["lepton_ps_bytes_pushed_total"] == ps["lepton_ps_pushed_bytes_total"]
    assert ps["lepton_ps_bytes_pulled_total"] == ps["lepton_ps_pulled_bytes_total"]
    assert ps['lepton_ps_staleness_updates_bucket{le="+Inf"}'] == ps["lepton_ps_updates_applied_total"]
    assert (
        ps['lepton_rpc_server_handled_total{code="OK",method="PushPullUnary",service="lepton.v1.ParameterServer"}'] > 0
    )
