"""Which optimizers may be sliced, the proof step that refuses one that cannot work, the layout
that keeps tensors whole, and what happens when a server's optimizer fails mid-job."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from coordinator.events import EventKind, EventLog
from coordinator.job import Job, JobState
from coordinator.layout import balance
from coordinator.membership import Role
from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import ConfigError, FailedPrecondition, InvalidArgument, OptimizerFailed
from lepton.optimizers import ELEMENT_WISE, PER_TENSOR, REFUSED, Granularity, granularity, prove_optimizer
from lepton.tensors import TensorSpec
from lepton.workloads import EmbeddingBagClassifier, sparse_parameter_names
from ps_server.consistency import consistency_gate
from ps_server.store import ParameterStore

TORCH_OPTIMIZERS = sorted(
    name.lower()
    for name in dir(torch.optim)
    if isinstance(getattr(torch.optim, name), type)
    and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
    and getattr(torch.optim, name) is not torch.optim.Optimizer
)


def mlp_params() -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    return [(n, p.detach()) for n, p in model.named_parameters()]


# --- the table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCH_OPTIMIZERS)
def test_every_torch_optimizer_has_exactly_one_decided_granularity(name):
    # A torch release that adds an optimizer fails here until someone decides, from its source,
    # whether it may be sliced.
    tables = [name in ELEMENT_WISE, name in PER_TENSOR, name in REFUSED]
    assert sum(tables) == 1, f"{name}: decide whether it is element-wise (lepton/optimizers.py)"


def test_element_wise_optimizers_may_be_sliced_and_the_others_keep_tensors_whole():
    served = [n for n in TORCH_OPTIMIZERS if n not in REFUSED]
    assert {n for n in served if granularity(n) is Granularity.ELEMENT} == set(ELEMENT_WISE)
    assert granularity("Adafactor") is Granularity.TENSOR
    assert granularity("muon") is Granularity.TENSOR


def test_lbfgs_is_refused_with_its_name_and_why():
    with pytest.raises(ConfigError, match="LBFGS .*closure"):
        granularity("lbfgs")


@pytest.mark.parametrize("name", sorted(ELEMENT_WISE - {"sparseadam"}))
def test_an_element_wise_optimizer_updates_a_row_slice_exactly_as_the_whole_tensor(name):
    # The claim the table makes, checked: two steps on rows [0, 3) and [3, 5) of a weight equal
    # two steps on the whole weight.
    torch.manual_seed(1)
    weight, grads = torch.randn(5, 4), [torch.randn(5, 4) for _ in range(2)]
    whole = nn.Parameter(weight.clone())
    halves = [nn.Parameter(weight[:3].clone()), nn.Parameter(weight[3:].clone())]
    cls = next(getattr(torch.optim, a) for a in dir(torch.optim) if a.lower() == name)
    opts = [cls([whole], lr=0.01), cls([halves[0]], lr=0.01), cls([halves[1]], lr=0.01)]
    for g in grads:
        whole.grad, halves[0].grad, halves[1].grad = g.clone(), g[:3].clone(), g[3:].clone()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(torch.cat([h.detach() for h in halves]), whole.detach(), rtol=1e-6, atol=1e-7)


def test_adafactor_updates_a_row_slice_differently_from_the_whole_tensor():
    # Why Adafactor gets whole tensors: its factored moments and RMS scaling read the whole tensor.
    torch.manual_seed(1)
    weight, g = torch.randn(6, 4), torch.randn(6, 4)
    whole, half = nn.Parameter(weight.clone()), nn.Parameter(weight[:3].clone())
    whole.grad, half.grad = g.clone(), g[:3].clone()
    torch.optim.Adafactor([whole], lr=0.01).step()
    torch.optim.Adafactor([half], lr=0.01).step()
    assert not torch.allclose(whole.detach()[:3], half.detach(), rtol=1e-5, atol=0)


# --- the proof step ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "lr", "kwargs", "reason"),
    [
        ("adam", 0.01, {"betas": [0.9, 0.99, 0.9]}, "too many values to unpack"),
        ("lbfgs", 0.01, {}, "closure"),
        ("sparseadam", 0.01, {}, "SparseAdam does not support dense gradients"),
        ("adam", math.inf, {}, "non-finite"),
        ("sgd", math.nan, {}, "Invalid learning rate|non-finite"),
        ("muon", 0.01, {}, "Muon only supports 2D parameters"),
        ("adam", 0.01, {"no_such_keyword": 1}, "no_such_keyword"),
        ("rmsprop", 0.01, {"alpha": -1}, "Invalid alpha value"),
        ("nosuch", 0.01, {}, "no optimizer 'nosuch'"),
    ],
)
def test_an_optimizer_that_cannot_step_is_refused_with_torchs_reason(name, lr, kwargs, reason):
    params = mlp_params()
    before = [p.clone() for _, p in params]
    with pytest.raises(ConfigError, match=reason):
        prove_optimizer(params, frozenset(), name, lr, kwargs)
    assert all(torch.equal(a, p) for a, (_, p) in zip(before, params, strict=True)), "the proof step changed the model"


def test_a_schedule_that_fails_its_first_step_is_refused():
    with pytest.raises(ConfigError, match="lr_schedule"):
        prove_optimizer(mlp_params(), frozenset(), "sgd", 0.1, {}, "step", {"step_size": "x"})


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("sgd", {"momentum": 0.9, "weight_decay": 0.1}), ("adamw", {"weight_decay": 0.1}), ("adafactor", {}),
     ("rprop", {}), ("asgd", {}), ("nadam", {})],
)
def test_a_working_optimizer_passes_and_leaves_the_model_untouched(name, kwargs):
    params = mlp_params()
    before = [p.clone() for _, p in params]
    kind = prove_optimizer(params, frozenset(), name, 0.01, kwargs, "cosine", {"t_max": 10})
    assert kind is granularity(name)
    assert all(torch.equal(a, p) for a, (_, p) in zip(before, params, strict=True))


def test_a_model_with_a_sparse_embedding_passes_with_empty_row_sparse_gradients():
    model = EmbeddingBagClassifier(vocab_size=50, num_classes=3, dim=4)
    sparse = sparse_parameter_names(model)
    params = [(n, p.detach()) for n, p in model.named_parameters()]
    assert prove_optimizer(params, sparse, "adam", 0.01, {}) is Granularity.ELEMENT
    with pytest.raises(ConfigError, match="no sparse-gradient form"):
        prove_optimizer(params, sparse, "rmsprop", 0.01, {})


@pytest.mark.parametrize("lr", [math.inf, -math.inf, math.nan, 0.0])
def test_a_job_spec_refuses_a_learning_rate_that_is_not_finite_and_positive(lr):
    with pytest.raises(ConfigError, match="lr must be a finite number > 0"):
        JobSpec(lr=lr)


# --- the whole-tensor layout -------------------------------------------------------------------


def test_whole_tensor_layout_never_slices_and_balances_largest_first():
    tensors = [
        TensorSpec("a", torch.float32, (10, 4)),  # 160 B
        TensorSpec("b", torch.float32, (4,)),  # 16 B
        TensorSpec("c", torch.float32, (8, 4)),  # 128 B
        TensorSpec("d", torch.float32, (3,)),  # 12 B
    ]
    layout = balance(tensors, ["ps-0", "ps-1"], version=1, whole_tensors=True)
    assert not any(t.is_slice for t in layout.tensors)
    assert sorted(t.name for t in layout.tensors) == ["a", "b", "c", "d"]
    # a (160) to ps-0, c (128) to ps-1, b (16) to ps-1 (144), d (12) to ps-1 (156); model order kept
    assert [t.name for t in layout.tensors_of("ps-0")] == ["a"]
    assert [t.name for t in layout.tensors_of("ps-1")] == ["b", "c", "d"]
    assert layout == balance(list(tensors), ["ps-0", "ps-1"], version=1, whole_tensors=True)


def test_whole_tensor_layout_refuses_more_servers_than_tensors():
    tensors = [TensorSpec("a", torch.float32, (10, 4)), TensorSpec("b", torch.float32, (4,))]
    with pytest.raises(InvalidArgument, match="3 parameter servers for 2 tensors"):
        balance(tensors, ["ps-0", "ps-1", "ps-2"], version=1, whole_tensors=True)


def test_the_coordinator_refuses_a_whole_tensor_job_with_more_servers_than_tensors():
    from coordinator.main import build_job

    # mlp on digits has 4 tensors
    with pytest.raises(ConfigError, match="adafactor.*5 parameter servers would leave one with nothing; use at most 4"):
        build_job(JobSpec(optimizer="adafactor", parameter_servers=5))
    job = build_job(JobSpec(optimizer="adafactor", parameter_servers=4))
    servers = [job.register(Role.PARAMETER_SERVER, f"10.0.0.{i}:7000", 0.0).member_id for i in range(4)]
    layout, _ = job.layout()
    assert [len(layout.tensors_of(s)) for s in servers] == [1, 1, 1, 1]


def test_a_job_of_a_per_tensor_optimizer_lays_out_whole_tensors():
    initial = {"w": torch.zeros(40, 4), "b": torch.zeros(4)}
    spec = JobSpec(optimizer="adafactor", parameter_servers=2, heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0)
    job = Job(spec, 30, initial, events=EventLog(wall_clock=lambda: 0.0))
    for i in range(2):
        job.register(Role.PARAMETER_SERVER, f"10.0.0.{i}:7000", 0.0)
    layout, _ = job.layout()
    assert not any(t.is_slice for t in layout.tensors), layout
    sliced = Job(spec.replace(optimizer="adam"), 30, initial, events=EventLog(wall_clock=lambda: 0.0))
    for i in range(2):
        sliced.register(Role.PARAMETER_SERVER, f"10.0.0.{i}:7000", 0.0)
    assert any(t.is_slice for t in sliced.layout()[0].tensors)


# --- a step that fails at run time -------------------------------------------------------------


class FailsAtSecondStep(torch.optim.SGD):
    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise RuntimeError("boom at step 2")
        return super().step(closure)


@pytest.fixture
def failing_optimizer(monkeypatch):
    monkeypatch.setattr(torch.optim, "FailsAtSecondStep", FailsAtSecondStep, raising=False)
    return "failsatsecondstep"


def store_and_grads() -> tuple[ParameterStore, dict[str, torch.Tensor]]:
    return ParameterStore({"w": torch.ones(2, 2)}, "failsatsecondstep", 0.1, {}), {"w": torch.ones(2, 2)}


def test_a_failed_step_refuses_every_later_update_with_the_reason(failing_optimizer):
    store, g = store_and_grads()
    assert store.apply(g) == 1
    with pytest.raises(OptimizerFailed, match="optimizer failsatsecondstep failed at update 2: RuntimeError: boom"):
        store.apply(g)
    assert store.failure and store.version == 1
    with pytest.raises(OptimizerFailed, match="boom"):  # never tried again: torch may be half-way
        store.apply(g)


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_the_gate_refuses_pushes_once_the_optimizer_failed(failing_optimizer, mode):
    store, g = store_and_grads()
    gate = consistency_gate(store, mode, 5.0)
    gate.push("w-0", 0, g, 1, 0.0)
    with pytest.raises(OptimizerFailed):
        gate.push("w-0", 1, g, 1, 0.0)
    with pytest.raises(OptimizerFailed):
        gate.push("w-1", 1, g, 1, 0.0)


def test_a_sync_push_waiting_for_its_step_fails_at_once_when_the_step_fails(failing_optimizer):
    import threading

    store, g = store_and_grads()
    gate = consistency_gate(store, "sync", 60.0)
    assert gate.push("w-0", 0, g, 1, 0.0) == 1  # w-0 alone closes step 0
    gate.wait_for_version(1, 1.0)
    gate.join("w-1", 1, 1.0)
    target = gate.push("w-0", 1, g, 1, 0.0)  # waits for w-1
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            gate.wait_for_version(target, 60.0)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    with pytest.raises(OptimizerFailed):
        gate.push("w-1", 1, g, 1, 0.0)  # closes step 1: the optimizer raises
    waiter.join(timeout=10)  # far below the 60 s step timeout the waiter would otherwise hit
    assert not waiter.is_alive() and isinstance(outcome[0], OptimizerFailed), outcome


def test_a_failure_reported_by_a_parameter_server_fails_the_job_with_its_reason():
    clock = FakeClock()
    job = Job(JobSpec(parameter_servers=1), 30, {"w": torch.zeros(3)}, events=EventLog(wall_clock=lambda: 0.0))
    ps = job.register(Role.PARAMETER_SERVER, "10.0.0.1:7000", clock.now())
    job.ready(ps.member_id, ps.incarnation, job.layout_version, clock.now())
    w = job.register(Role.WORKER, "", clock.now())
    with pytest.raises(InvalidArgument):
        job.report_failure(ps.member_id, ps.incarnation, "  ", clock.now())
    with pytest.raises(InvalidArgument):
        job.report_failure(ps.member_id, ps.incarnation, "x" * 2001, clock.now())
    with pytest.raises(FailedPrecondition, match="not a parameter server"):
        job.report_failure(w.member_id, w.incarnation, "boom", clock.now())
    assert job.state is JobState.TRAINING  # refused reports change nothing

    assert job.report_failure(ps.member_id, ps.incarnation, "optimizer sgd failed", clock.now()) is JobState.FAILED
    assert job.status(clock.now()).failure == f"parameter server {ps.member_id}: optimizer sgd failed"
    changed = [e for e in job.events.after(0) if e.kind is EventKind.JOB_STATE_CHANGED]
    assert "optimizer sgd failed" in changed[-1].message
    # a second report (the same server retrying) changes nothing
    job.report_failure(ps.member_id, ps.incarnation, "another", clock.now())
    assert "another" not in job.status(clock.now()).failure


# --- foreach on the server ---------------------------------------------------------------------

FOREACH_CASES = [
    ("sgd", {}), ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("sgd", {"momentum": 0.9, "dampening": 0.1, "maximize": True}),
    ("adam", {}), ("adam", {"weight_decay": 0.1, "maximize": True}), ("adam", {"amsgrad": True}),
    ("adam", {"betas": (0.8, 0.9), "eps": 1e-6}), ("adamw", {}), ("adamw", {"amsgrad": True, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, kwargs", FOREACH_CASES)
def test_the_store_uses_foreach_and_gets_the_for_loops_numbers_exactly(name, kwargs, dtype):
    """FOREACH_EXACT's promise: a store with foreach matches torch's default (for-loop) optimizer
    bit for bit, over steps with a changing learning rate and a tensor without a gradient."""
    torch.manual_seed(3)
    tensors = {
        "w": torch.randn(257, 33, dtype=dtype),
        "b": torch.randn(10, dtype=dtype),
        "s": torch.randn((), dtype=dtype),
    }
    store = ParameterStore(tensors, name, 0.01, kwargs, "step", {"step_size": 2, "gamma": 0.5})
    assert store._optimizer.param_groups[0]["foreach"] is True
    params = {n: nn.Parameter(t.clone()) for n, t in tensors.items()}
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    reference = cls(list(params.values()), lr=0.01, foreach=False, **kwargs)
    schedule = torch.optim.lr_scheduler.StepLR(reference, step_size=2, gamma=0.5)
    for step in range(12):
        grads = {
            n: torch.randn_like(t) * 10.0 ** (step % 5 - 2)
            for n, t in tensors.items()
            if not (step % 3 == 0 and n == "b")
        }
        store.apply(grads)
        for n, p in params.items():
            p.grad = grads.get(n)
        reference.step()
        schedule.step()
    state = store.state_dict()["params"]
    for n, p in params.items():
        assert torch.equal(state[n], p.detach()), n


def test_a_job_that_names_foreach_or_fused_keeps_its_choice():
    store = ParameterStore({"w": torch.zeros(3)}, "adam", 0.1, {"foreach": False}, "constant")
    assert store._optimizer.param_groups[0]["foreach"] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_gradients_whose_sum_overflows_are_accepted_and_nan_or_inf_refused(dtype):
    big = torch.finfo(dtype).max
    store = ParameterStore({"w": torch.zeros(4, dtype=dtype)}, "sgd", 0.0, {}, "constant")
    store.check_gradients({"w": torch.tensor([big, big, -0.0, 1.0], dtype=dtype)})  # the sum is inf
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = torch.ones(4, dtype=dtype)
        g[2] = bad
        with pytest.raises(InvalidArgument, match="NaN or Inf"):
            store.check_gradients({"w": g})
    g = torch.tensor([big, big, float("nan"), 1.0], dtype=dtype)
    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        store.check_gradients({"w": g})
