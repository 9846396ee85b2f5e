"""Async staleness-aware learning rates: the policy's decisions, the gate applying them to one
push, and the store scaling one optimizer step without touching the schedule or the other modes."""

from __future__ import annotations

import pytest
import torch

from lepton.errors import ConfigError
from ps_server.consistency import consistency_gate
from ps_server.gate import ConsistencyGate, PushOutcome, PushResult
from ps_server.staleness import ConstantLr, InverseStalenessLr, StalenessAwareLr, staleness_lr_scaling
from ps_server.store import ParameterStore

LR = 0.1
T0 = 1000.0


def initial() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, -2.0, 3.0]), "b": torch.tensor([0.5])}


def gradient(k: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, 0.5, -1.0]) * k, "b": torch.tensor([2.0]) * k}


def torch_steps(lrs: list[float], optimizer: str = "sgd", **kwargs) -> dict[str, torch.Tensor]:
    """Plain torch.optim, one step per entry of ``lrs`` at that lr, gradient(i + 1) at step i."""
    params = {n: torch.nn.Parameter(t.clone()) for n, t in initial().items()}
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    opt = cls(list(params.values()), lr=LR, **kwargs)
    for i, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for n, p in params.items():
            p.grad = gradient(i + 1)[n]
        opt.step()
    return {n: p.detach() for n, p in params.items()}


def assert_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("staleness", "workers", "scale"),
    [
        (0, 3, 1.0), (2, 3, 1.0),  # the steady state of 3 workers: full rate
        (4, 3, 0.5), (20, 3, 0.1),  # staler than W - 1 = 2: 2 / s
        (1, 1, 1.0), (3, 1, 1 / 3), (1, 2, 1.0), (5, 2, 0.2),  # tolerance is at least 1
        (8, 9, 1.0), (16, 9, 0.5),
    ],
)
def test_a_push_staler_than_the_other_workers_gets_the_rate_times_their_count_over_its_staleness(
    staleness, workers, scale
):
    assert StalenessAwareLr().lr_scale(staleness, workers) == pytest.approx(scale)
    assert ConstantLr().lr_scale(staleness, workers) == 1.0
    assert InverseStalenessLr().lr_scale(staleness, workers) == pytest.approx(1 / max(1, staleness))


def test_the_policy_is_chosen_by_its_job_spec_name():
    assert isinstance(staleness_lr_scaling("staleness"), StalenessAwareLr)
    assert isinstance(staleness_lr_scaling("none"), ConstantLr)
    assert isinstance(staleness_lr_scaling("inverse"), InverseStalenessLr)
    with pytest.raises(ConfigError, match="async_lr_scaling"):
        staleness_lr_scaling("zhang")


def async_gate(optimizer: str = "sgd", policy=StalenessAwareLr(), **kwargs) -> ConsistencyGate:
    return consistency_gate(ParameterStore(initial(), optimizer, LR, kwargs), "async", 5.0, lr_scaling=policy)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_an_async_push_staler_than_the_steady_state_is_applied_at_a_scaled_rate(optimizer):
    gate = async_gate(optimizer)
    # two workers (tolerance 1): a and b push from version 0, then b pushes from version 0 again
    # at version 2 (staleness 2: rate halved), then a from version 3 (staleness 0)
    assert gate.push("a", 0, gradient(1), 1, T0) == PushResult(PushOutcome.APPLIED, 1, 0)
    assert gate.push("b", 0, gradient(2), 1, T0) == PushResult(PushOutcome.APPLIED, 2, 1)
    assert gate.push("b", 0, gradient(3), 1, T0) == PushResult(PushOutcome.APPLIED, 3, 2)
    assert gate.push("a", 3, gradient(4), 1, T0) == PushResult(PushOutcome.APPLIED, 4, 0)
    assert gate.counters.pushes_lr_scaled == 1
    assert_tensors(dict(gate.snapshot()[1]), torch_steps([LR, LR, LR / 2, LR], optimizer))
    assert gate.store.lr == LR  # the scaled rate lasted one step


def test_with_scaling_off_every_async_push_is_applied_at_the_full_rate():
    gate = async_gate(policy=ConstantLr())
    for base, k in [(0, 1), (0, 2), (0, 3)]:
        gate.push("a" if k == 1 else "b", base, gradient(k), 1, T0)
    assert gate.counters.pushes_lr_scaled == 0
    assert_tensors(dict(gate.snapshot()[1]), torch_steps([LR, LR, LR]))


def test_workers_declared_dead_stop_counting_towards_the_tolerance():
    gate = async_gate()
    for member in ("a", "b", "c"):  # three pushers: tolerance 2
        gate.push(member, gate.version, gradient(1), 1, T0)
    gate.push("a", 1, gradient(1), 1, T0)  # staleness 2: full rate
    assert gate.counters.pushes_lr_scaled == 0
    gate.retain_live({"a"})  # b and c died: one pusher, tolerance 1
    gate.push("a", 2, gradient(1), 1, T0)  # staleness 2: halved
    assert gate.counters.pushes_lr_scaled == 1


@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_sync_and_ssp_updates_are_never_scaled(mode):
    gate = consistency_gate(ParameterStore(initial(), "sgd", LR, {}), mode, 5.0, staleness=100)
    outcome = gate.push("a", 0, gradient(1), 1, T0)
    if mode == "ssp":
        for k in (2, 3, 4):
            gate.push("a", 0, gradient(k), 1, T0)  # staleness 1, 2, 3 from one worker
        expected = torch_steps([LR] * 4)
    else:
        assert outcome == 1
        expected = torch_steps([LR])
    assert gate.counters.pushes_lr_scaled == 0
    assert_tensors(dict(gate.snapshot()[1]), expected)


@pytest.mark.parametrize(
    ("schedule", "kwargs", "reference"),
    [
        ("step", {"step_size": 2, "gamma": 0.5}, lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)),
        ("cosine", {"t_max": 5, "eta_min": 0.01}, lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5, 0.01)),
    ],
)
def test_a_scaled_step_scales_the_schedules_rate_and_leaves_the_schedule_as_torch_has_it(schedule, kwargs, reference):
    scales = [1.0, 0.5, 1.0, 0.25, 1.0, 1.0, 0.1]
    store = ParameterStore(initial(), "sgd", LR, {"momentum": 0.9}, schedule, kwargs)
    params = {n: torch.nn.Parameter(t.clone()) for n, t in initial().items()}
    opt = torch.optim.SGD(list(params.values()), lr=LR, momentum=0.9)
    scheduler = reference(opt)
    for i, scale in enumerate(scales):
        assert store.lr == pytest.approx(opt.param_groups[0]["lr"])  # the schedule never saw a scale
        store.apply(gradient(i + 1), scale)
        lr = opt.param_groups[0]["lr"]
        opt.param_groups[0]["lr"] = lr * scale
        for n, p in params.items():
            p.grad = gradient(i + 1)[n]
        opt.step()
        opt.param_groups[0]["lr"] = lr
        scheduler.step()
    assert_tensors(dict(store.snapshot()), {n: p.detach() for n, p in params.items()})
