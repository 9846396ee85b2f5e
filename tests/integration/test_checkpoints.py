"""Coordinated checkpoints against real servers on 127.0.0.1:0: `lepton checkpoint --wait` (a real
process) against a running job, export of the result, bad input, and the admin role."""

from __future__ import annotations

import subprocess
import threading

import pytest
import torch

from coordinator.main import serve as serve_coordinator
from lepton.auth import METHOD_ROLES
from lepton.clients import CoordinatorClient
from lepton.config import JobSpec
from lepton.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from lepton.ops.certs import make_dev_pki
from lepton.ops.export import export_checkpoint
from lepton.process import ServiceOptions
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.workloads import build_model, load_workload
from ps_server.main import serve as serve_ps
from support import lepton_argv, read_json, wait_until

from .conftest import start_cluster, stop_cluster
from .test_security_and_metrics import SPEC as SECURE_SPEC
from .test_security_and_metrics import security

SPEC = JobSpec(epochs=1, shards_per_epoch=4, parameter_servers=2, heartbeat_interval_s=0.2, heartbeat_timeout_s=600.0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_dev_pki(tmp_path_factory.mktemp("pki"), ["localhost", "127.0.0.1"])


@pytest.fixture(scope="module")
def durable_cluster(tmp_path_factory):
    """A coordinator and two servers, each with a --state-dir, and no workers (an async job that
    waits for them, so the servers stay at version 0)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    stops = [threading.Event() for _ in range(3)]
    threads = [threading.Thread(
        target=serve_coordinator, args=(SPEC, "127.0.0.1:0", stops[0]),
        kwargs={"ready_file": str(tmp / "c.json"), "grace_s": 0.5, "state_dir": str(tmp / "coordinator")}, daemon=True,
    )]
    threads[0].start()
    address = wait_until(lambda: read_json(tmp / "c.json"), 60, "the coordinator")["address"]
    for i in range(2):
        threads.append(threading.Thread(
            target=serve_ps, args=(address, "127.0.0.1:0", stops[i + 1]),
            kwargs={"ready_file": str(tmp / f"ps{i}.json"), "grace_s": 0.5, "member_id": f"ps-{i}",
                    "state_dir": str(tmp / f"ps-{i}")},
            daemon=True,
        ))
        threads[-1].start()
    client = CoordinatorClient(address)
    wait_until(lambda: client.status().state == cpb.JOB_STATE_TRAINING, 60, "training to start")
    try:
        yield address, tmp, client
    finally:
        client.close()
        for stop in stops:
            stop.set()
        for t in threads:
            t.join(timeout=10)


def test_lepton_checkpoint_waits_for_every_server_and_export_gives_the_models_tensors(durable_cluster, tmp_path):
    address, state, client = durable_cluster
    done = subprocess.run(
        lepton_argv("checkpoint", "--coordinator", address, "--wait", "--timeout", "30", "--reason", "test"),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    checkpoint_id = done.stdout.split()[1]
    assert f"checkpoint {checkpoint_id} complete" in done.stdout
    manifest = client.checkpoint(checkpoint_id)
    assert manifest.state == cpb.CHECKPOINT_STATE_COMPLETE and manifest.reason == "test"
    assert sorted(s.member_id for s in manifest.servers) == ["ps-0", "ps-1"]
    assert all(s.version == 0 and s.path in done.stdout for s in manifest.servers)
    assert client.status().last_checkpoint.checkpoint_id == checkpoint_id
    assert client.checkpoint().checkpoint_id == checkpoint_id  # "" = the newest complete one

    # Export from the coordinator's state directory, no cluster needed: version 0 is the model
    # the job initialised, tensor for tensor.
    result = export_checkpoint(state / "coordinator", tmp_path / "model.pt")
    assert result.checkpoint_id == checkpoint_id
    model = build_model(SPEC.model, load_workload(SPEC.dataset, SPEC.seed), SPEC.seed)
    expected = {name: p.detach() for name, p in model.named_parameters()}
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[n], expected[n]) for n in expected)
    model.load_state_dict(exported)


def test_bad_checkpoint_requests_get_precise_statuses_and_change_nothing(durable_cluster):
    _, _, client = durable_cluster
    with pytest.raises(InvalidArgument):
        client.checkpoint("../../etc/passwd")
    with pytest.raises(NotFound):
        client.checkpoint("ckpt-999999")
    first = client.request_checkpoint("").checkpoint_id
    wait_until(lambda: client.checkpoint(first).state == cpb.CHECKPOINT_STATE_COMPLETE, 30, "the checkpoint")
    with pytest.raises(InvalidArgument):
        client.request_checkpoint("x" * 201)
    second = client.request_checkpoint("").checkpoint_id
    assert int(second.removeprefix("ckpt-")) == int(first.removeprefix("ckpt-")) + 1


def test_every_rpc_has_a_role_and_checkpoint_requests_need_an_admin():
    methods = {
        f"/lepton.v1.{service.name}/{m.name}"
        for service in (
            cpb.DESCRIPTOR.services_by_name["Coordinator"],
            ppb.DESCRIPTOR.services_by_name["ParameterServer"],
        )
        for m in service.methods
    }
    assert methods == set(METHOD_ROLES)
    assert METHOD_ROLES["/lepton.v1.Coordinator/RequestCheckpoint"] == {"admin"}


def test_checkpoint_needs_an_admin_token_and_fails_on_servers_without_a_state_dir(tmp_path, pki):
    cluster = start_cluster(
        tmp_path, SECURE_SPEC,
        coordinator_options=ServiceOptions(security=security(pki, None, server=True)),
        ps_options=ServiceOptions(security=security(pki, "ps", server=True)),
    )
    try:
        anonymous = CoordinatorClient(cluster.coordinator, security=security(pki, None))
        worker = CoordinatorClient(cluster.coordinator, security=security(pki, "worker"))
        admin = CoordinatorClient(cluster.coordinator, security=security(pki, "admin"))
        try:
            wait_until(lambda: admin.status().state == cpb.JOB_STATE_TRAINING, 60, "training to start")
            with pytest.raises(Unauthenticated):
                anonymous.request_checkpoint("")
            with pytest.raises(PermissionDenied):
                worker.request_checkpoint("")
            checkpoint_id = admin.request_checkpoint("").checkpoint_id
            assert checkpoint_id == "ckpt-000001"  # the refused calls opened nothing
            failed = wait_until(
                lambda: (c := admin.checkpoint(checkpoint_id)).state == cpb.CHECKPOINT_STATE_FAILED and c, 30,
                "the checkpoint to fail",
            )
            assert "without --state-dir" in failed.error
            assert worker.checkpoint(checkpoint_id).checkpoint_id == checkpoint_id  # reading is open to members
        finally:
            for c in (anonymous, worker, admin):
                c.close()
    finally:
        stop_cluster(cluster)
