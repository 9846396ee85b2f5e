"""Where a worker trains and at what precision: device names resolved or refused (exit 2 naming
the device), bf16 and fp16 autocast on the CPU (the path CI has), the fp16 loss scaler skipping
overflowing steps without pushing, whole jobs trained with them through real servers in this
process, and a CUDA check that runs only where a GPU exists."""

from __future__ import annotations

import subprocess
import threading
from functools import partial

import pytest
import torch

from lepton.clients import CoordinatorClient, ParameterClient
from lepton.config import JobSpec
from lepton.errors import ConfigError
from lepton.process import EXIT_CONFIG
from lepton.v1 import coordinator_pb2 as cpb
from support import lepton_argv
from worker.agent import WorkerAgent
from worker.device import LossScaler, clip_by_global_norm, resolve_device
from worker.trainer import Trainer

from .conftest import start_cluster, stop_cluster

HAS_CUDA = torch.cuda.is_available()


def small_job(**changes) -> JobSpec:
    spec = JobSpec(dataset="integration.custom_workload:blobs", model="mlp", batch_size=16, seed=5, device="cpu")
    return spec.replace(**changes)


# --- resolving devices ----------------------------------------------------------------------------


def test_cpu_and_auto_resolve_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_a_cuda_device_is_refused_naming_it_where_there_is_none(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=f"device {name} was requested, but this machine has no CUDA device"):
        resolve_device(name)


def test_a_cuda_index_beyond_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"device cuda:2 was requested, but this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["tpu", "cuda:", "cuda:-1", "CPU", ""])
def test_what_is_no_device_name_is_refused(name):
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device(name)
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        small_job(device=name)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: the refusal cannot be shown")
def test_lepton_worker_with_cuda_on_a_machine_without_exits_2_naming_the_device(tmp_path):
    # Refused before it registers: the coordinator's address is never dialled.
    result = subprocess.run(
        lepton_argv("worker", "--coordinator", "127.0.0.1:0", "--device", "cuda:1"),
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "device cuda:1 was requested, but this machine has no CUDA device" in result.stderr


def test_bad_values_of_the_new_job_fields_are_refused():
    for changes, text in [
        ({"precision": "fp8"}, "precision must be one of"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm must be a finite number >= 0"),
        ({"clip_grad_norm": float("inf")}, "clip_grad_norm must be a finite number >= 0"),
        ({"warmup_steps": -2}, "warmup_steps must be >= 0"),
        ({"accumulate": 0}, "accumulate must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=text):
            small_job(**changes)


# --- precision on the CPU -------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_runs_the_forward_pass_in_half_precision_and_pushes_float32(precision):
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    trainer = Trainer(small_job(), precision=precision)
    reference = Trainer(small_job())
    seen = []
    trainer.model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))  # type: ignore[index]
    indices = torch.arange(32)
    loss, grads = trainer.gradients(indices)
    ref_loss, ref_grads = reference.gradients(indices)
    assert seen == [half, half]  # 32 samples: two micro-batches of batch_size 16
    assert grads is not None and set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert g.dtype == torch.float32 and g.device.type == "cpu"
        torch.testing.assert_close(g, ref_grads[name], rtol=0.05, atol=0.02)  # half precision, not equal
    assert loss == pytest.approx(ref_loss, rel=0.05)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_the_fp16_scaler_skips_an_overflowing_step_and_halves_its_scale():
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    grads = [torch.tensor([8.0, 16.0])]
    assert scaler.unscale(grads) and torch.equal(grads[0], torch.tensor([1.0, 2.0])) and scaler.scale == 8.0
    assert scaler.unscale([torch.tensor([8.0])]) and scaler.scale == 16.0  # two good steps: doubled
    assert not scaler.unscale([torch.tensor([float("inf"), 1.0])])
    assert scaler.scale == 8.0 and scaler.skipped == 1


def test_an_fp16_step_whose_scaled_gradients_overflow_returns_nothing_to_push():
    trainer = Trainer(small_job(), precision="fp16")
    assert trainer.scaler is not None
    trainer.scaler.scale = 2.0**120  # the scaled loss overflows float16 in backward
    loss, grads = trainer.gradients(torch.arange(16))
    assert grads is None and trainer.scaler.skipped == 1 and trainer.scaler.scale == 2.0**119
    assert loss == loss  # the loss itself (unscaled) is still finite


def test_clipping_by_global_norm_equals_torch_clip_grad_norm():
    torch.manual_seed(0)
    grads = [torch.randn(3, 4) * 5, torch.randn(7) * 5]
    expected = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for p, g in zip(params, expected, strict=True):
        p.grad = g
    norm = clip_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(params, 1.0)), rel=1e-6)
    for g, p in zip(grads, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=0)


# --- whole jobs in this process -------------------------------------------------------------------


def run_workers(
    cluster, n: int, timeout_s: float = 120, **agent_args
) -> tuple[list[WorkerAgent], list[int], cpb.GetStatusResponse]:
    stop = threading.Event()
    results: list[int] = []
    clients = [CoordinatorClient(cluster.coordinator) for _ in range(n)]
    agents = [WorkerAgent(c, stop, **agent_args) for c in clients]
    threads = [threading.Thread(target=lambda a=a: results.append(a.run()), daemon=True) for a in agents]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout_s)
        assert not any(t.is_alive() for t in threads), "a worker did not finish"
        return agents, results, clients[0].status()
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:
                t.join(timeout=10)
        for c in clients:
            c.close()


def test_a_sync_bf16_job_with_accumulation_clipping_and_warmup_trains(tmp_path):
    spec = JobSpec(
        mode="sync", epochs=3, shards_per_epoch=6, parameter_servers=2, heartbeat_interval_s=0.2,
        heartbeat_timeout_s=2.0, device="cpu", precision="bf16", accumulate=2, clip_grad_norm=1.0, warmup_steps=5,
    )
    cluster = start_cluster(tmp_path, spec)
    try:
        agents, results, status = run_workers(cluster, 2)
    finally:
        stop_cluster(cluster)
    assert results == [0, 0]
    assert status.state == cpb.JOB_STATE_SUCCEEDED
    assert (status.job.precision, status.job.accumulate, status.job.warmup_steps) == ("bf16", 2, 5)
    assert status.job.clip_grad_norm == 1.0
    assert status.evaluation.accuracy > 0.85
    assert all(a._trainer is not None and a._trainer.last_grad_norm is not None for a in agents)


def test_sync_fp16_workers_whose_first_steps_overflow_push_nothing_and_still_train(tmp_path, monkeypatch):
    """A loss scale of 2**40 overflows float16 until it has halved some 24 times: those steps are
    skipped (each worker leaves the sync step, pushing nothing), then training goes on."""
    monkeypatch.setattr("worker.trainer.LossScaler", partial(LossScaler, init_scale=2.0**40))
    spec = JobSpec(
        mode="sync", epochs=3, shards_per_epoch=6, parameter_servers=2, heartbeat_interval_s=0.2,
        heartbeat_timeout_s=2.0, device="cpu",
    )
    cluster = start_cluster(tmp_path, spec)
    try:
        agents, results, status = run_workers(cluster, 2, precision="fp16")
        servers = [ParameterClient(a) for a in cluster.servers]
        try:
            rejected = [s.server_status().pushes_rejected for s in servers]
        except Exception:  # servers may already have left after the job ended
            rejected = []
        finally:
            for s in servers:
                s.close()
    finally:
        stop_cluster(cluster)
    assert results == [0, 0]
    assert status.state == cpb.JOB_STATE_SUCCEEDED
    assert status.job.precision == "fp32"  # the workers' --precision overrode the job's
    assert sum(a.skipped_steps for a in agents) >= 20
    scalers = [a._trainer.scaler for a in agents if a._trainer is not None]
    assert len(scalers) == 2 and all(s is not None and s.scale <= 2.0**20 for s in scalers)
    assert not any(rejected)
    assert status.evaluation.accuracy > 0.8


# --- CUDA, where there is one ---------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_on_cuda_the_model_lives_on_the_device_and_gradients_come_back_in_pinned_host_memory(precision):
    trainer = Trainer(small_job(device="cuda"), precision=precision)
    reference = Trainer(small_job())
    assert all(t.device.type == "cuda" for t in trainer.tensors.values())
    indices = torch.arange(32)
    _, grads = trainer.gradients(indices)
    _, ref_grads = reference.gradients(indices)
    assert grads is not None
    tolerance = {"fp32": (1e-4, 1e-5), "bf16": (0.05, 0.02), "fp16": (0.05, 0.02)}[precision]
    for name, g in grads.items():
        assert g.device.type == "cpu" and g.is_pinned() and g.dtype == torch.float32
        torch.testing.assert_close(g, ref_grads[name], rtol=tolerance[0], atol=tolerance[1])
    # pulled values (host tensors) land in the device replica
    values = {n: torch.full_like(t, 0.5, device="cpu") for n, t in reference.tensors.items()}
    with torch.no_grad():
        for name, t in trainer.tensors.items():
            t.copy_(values[name])
    assert trainer.evaluate().samples == 100
