"""Requests that try to make a server do more than they are worth, values no caller should send, and
clients that leave mid-call, against real servers on 127.0.0.1:0 (issue 12, items 7, 8, 9, 11)."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
import structlog

from lepton.clients import CoordinatorClient, ParameterClient
from lepton.config import JobSpec
from lepton.control_wire import member_ref
from lepton.domain import Role
from lepton.errors import InvalidArgument
from lepton.ops.status import show_status
from lepton.process import EXIT_JOB_FAILED, ServiceOptions
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cpb_grpc
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc
from support import wait_until
from worker.agent import WorkerAgent

from .conftest import start_cluster, stop_cluster
from .test_security_and_metrics import scrape

SPEC = JobSpec(epochs=1, shards_per_epoch=4, parameter_servers=1, heartbeat_interval_s=0.2, heartbeat_timeout_s=600.0)


def rss_bytes() -> int:
    """This process's resident set (the in-process servers live here)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def cluster(tmp_path):
    c = start_cluster(
        tmp_path, SPEC, coordinator_options=ServiceOptions(metrics_port=0), ps_options=ServiceOptions(metrics_port=0)
    )
    try:
        client = CoordinatorClient(c.coordinator)
        try:  # the servers have loaded their assignment once the job trains
            wait_until(lambda: client.status().state == cpb.JOB_STATE_TRAINING, 60, "the job to train")
        finally:
            client.close()
        yield c
    finally:
        stop_cluster(c)


def test_a_pull_naming_one_tensor_30000_times_is_invalid_and_grows_the_server_little(cluster):
    client = ParameterClient(cluster.servers[0])
    coordinator = CoordinatorClient(cluster.coordinator)
    try:
        member, _ = coordinator.register(Role.WORKER)
        _, tensors = client.pull(member)
        name = next(iter(tensors))
        request = ppb.PullRequest(member=member_ref(member), names=[name] * 30_000)
        stub = ppb_grpc.ParameterServerStub(client._channel)
        before = rss_bytes()
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Pull(request, timeout=30))
        grown = rss_bytes() - before
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"tensor {name!r} is asked for more than once" in raised.value.details()
        # The same rows twice, and a tensor both whole and by rows, are refused the same way.
        with pytest.raises(InvalidArgument, match="more than once"):
            client.pull(member, names=[name, name])
        print(f"request {request.ByteSize()} bytes; RSS {before / 2**20:.1f} MiB -> {(before + grown) / 2**20:.1f} MiB")
        assert grown < 32 * 2**20  # before the check, the server grew ~200 MB answering 293 MB
        _, again = client.pull(member, names=[name])  # and keeps serving
        assert again[name].shape == tensors[name].shape
    finally:
        client.close()
        coordinator.close()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("loss", float("nan"), "loss must be a finite number"),
        ("loss", float("inf"), "loss must be a finite number"),
        ("samples", -1, "samples must lie in"),
        ("samples", 2**62, "samples must lie in"),
    ],
)
def test_progress_with_unusable_values_is_invalid_and_status_json_stays_valid(cluster, capsys, field, value, message):
    coordinator = CoordinatorClient(cluster.coordinator)
    stub = cpb_grpc.CoordinatorStub(coordinator._channel)
    try:
        member, _ = coordinator.register(Role.WORKER)
        lease = wait_until(
            lambda: (d := coordinator.lease(member)).outcome == cpb.LEASE_OUTCOME_GRANTED and d.lease, 30, "a lease"
        )
        values = {"loss": 1.0, "samples": 2, field: value}
        before = coordinator.status()
        for rpc, request in (
            (stub.ReportProgress, cpb.ReportProgressRequest(
                member=member_ref(member), epoch=lease.epoch, shard=lease.shard, offset=2, **values)),
            (stub.CompleteShard, cpb.CompleteShardRequest(
                member=member_ref(member), epoch=lease.epoch, shard=lease.shard, **values)),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                rpc(request, timeout=5)
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert message in raised.value.details()
        after = coordinator.status()
        assert (after.samples_trained, after.shard_completions) == (before.samples_trained, before.shard_completions)
        capsys.readouterr()
        assert show_status(cluster.coordinator, as_json=True) == 0
        json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"status --json printed {c}"))
    finally:
        coordinator.close()


def test_unknown_ids_and_negative_sequences_get_what_is_true(cluster):
    coordinator = CoordinatorClient(cluster.coordinator)
    stub = cpb_grpc.CoordinatorStub(coordinator._channel)
    try:
        member, _ = coordinator.register(Role.WORKER)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.WatchJob(cpb.WatchJobRequest(after_sequence=-1), timeout=5))
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "after_sequence" in raised.value.details()
        ghost = common.MemberRef(member_id=member.member_id, incarnation=member.incarnation + 5)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Heartbeat(cpb.HeartbeatRequest(member=ghost), timeout=5)
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
        assert "never issued" in raised.value.details() and "superseded" not in raised.value.details()
        lease = wait_until(
            lambda: (d := coordinator.lease(member)).outcome == cpb.LEASE_OUTCOME_GRANTED and d.lease, 30, "a lease"
        )
        with pytest.raises(grpc.RpcError) as raised:
            stub.ReportProgress(cpb.ReportProgressRequest(
                member=member_ref(member), epoch=lease.epoch, shard=lease.shard, offset=1, lease_id=10**9), timeout=5)
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
        assert "is unknown: no such lease was ever issued" in raised.value.details()
    finally:
        coordinator.close()


@pytest.mark.parametrize("method", ["Push", "PushPull"])
@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_client_leaving_mid_stream_is_counted_as_it_left_and_logged_at_info(cluster, method, how):
    coordinator = CoordinatorClient(cluster.coordinator)
    channel = grpc.insecure_channel(cluster.servers[0])
    release = threading.Event()
    try:
        member, _ = coordinator.register(Role.WORKER)

        def requests():
            # Says one tensor follows (as Lepton's client says how many), then sends none.
            yield ppb.PushRequest(
                header=ppb.PushHeader(member=member_ref(member), base_version=0, sample_count=1, tensors=1)
            )
            release.wait(60)  # the rest of the stream never comes

        stub = ppb_grpc.ParameterServerStub(channel)
        rpc = stub.Push.future if method == "Push" else stub.PushPull
        key = f'{{method="{method}",service="lepton.v1.ParameterServer"}}'
        with structlog.testing.capture_logs() as logs:
            call = rpc(requests(), timeout=2.0 if how == "deadline" else 60.0)
            wait_until(lambda: scrape(cluster.metrics[1]).get(f"lepton_rpc_server_started_total{key}") == 1, 30,
                       "the server to start the handler")
            if how == "cancel":
                call.cancel()
            code = "CANCELLED" if how == "cancel" else "DEADLINE_EXCEEDED"
            handled = (
                f'lepton_rpc_server_handled_total{{code="{code}",method="{method}",'
                'service="lepton.v1.ParameterServer"}'
            )

            def counted() -> dict[str, float]:
                return {
                    k: v for k, v in scrape(cluster.metrics[1]).items()
                    if k.startswith("lepton_rpc_server_handled_total") and f'method="{method}"' in k
                }

            seen = wait_until(counted, 60, f"{method} to be counted")
            assert seen == {handled: 1.0}, logs
        metrics = scrape(cluster.metrics[1])
        assert metrics['lepton_ps_pushes_total{outcome="rejected"}'] == 0
        assert metrics["lepton_ps_updates_applied_total"] == 0  # a push cut short is never applied
        abandoned = [e for e in logs if e["event"] == "rpc_abandoned"]
        assert abandoned and all(e["log_level"] == "info" for e in abandoned)
        assert not [e for e in logs if e["event"] == "rpc_failed" or e.get("log_level") == "error"]
    finally:
        release.set()
        channel.close()
        coordinator.close()


def test_a_worker_exits_3_when_the_job_failed(cluster):
    admin = CoordinatorClient(cluster.coordinator)
    client = CoordinatorClient(cluster.coordinator)
    try:
        admin.cancel("the test ends the job as FAILED")
        assert admin.status().state == cpb.JOB_STATE_FAILED
        assert WorkerAgent(client, threading.Event()).run() == EXIT_JOB_FAILED == 3
    finally:
        client.close()
        admin.close()
