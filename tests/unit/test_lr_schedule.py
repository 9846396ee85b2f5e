"""Learning-rate schedules on the parameter servers: stepped once per applied update, so the lr at
version v is the torch scheduler's value after v steps, checkpoint restores included."""

from __future__ import annotations

import pytest
import torch

from lepton.errors import ConfigError, InvalidArgument
from ps_server.checkpoint_files import CheckpointDirectory
from ps_server.consistency import consistency_gate
from ps_server.parameter_server import ParameterServer
from ps_server.store import ParameterStore

LR = 0.1
UPDATES = 12
SCHEDULES = {
    "constant": ("constant", {}),
    "step": ("step", {"step_size": 3, "gamma": 0.5}),
    "cosine": ("cosine", {"t_max": 8, "eta_min": 0.01}),  # runs past t_max: the cosine rises again
}


def initial() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, -2.0, 3.0]), "b": torch.tensor([0.5])}


def gradient(update: int) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, 0.5, -1.0]) * (update + 1), "b": torch.tensor([0.25 * update])}


def torch_reference(schedule: str, updates: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(lr of each update, final tensors) with plain torch.optim.SGD(momentum) and its scheduler."""
    params = {n: torch.nn.Parameter(t.clone()) for n, t in initial().items()}
    opt = torch.optim.SGD(list(params.values()), lr=LR, momentum=0.9)
    name, kwargs = SCHEDULES[schedule]
    scheduler = {
        "constant": lambda: None,
        "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=0.01),
    }[name]()
    lrs = []
    for update in range(updates):
        lrs.append(opt.param_groups[0]["lr"])
        for n, p in params.items():
            p.grad = gradient(update)[n]
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return lrs, {n: p.detach() for n, p in params.items()}


def make_store(schedule: str) -> ParameterStore:
    name, kwargs = SCHEDULES[schedule]
    return ParameterStore(initial(), "sgd", LR, {"momentum": 0.9}, name, kwargs)


def train(store: ParameterStore, first: int, last: int) -> list[float]:
    """Applies updates first..last-1; returns the lr each one used."""
    lrs = []
    for update in range(first, last):
        assert store.version == update
        lrs.append(store.lr)
        store.apply(gradient(update))
    return lrs


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_lr_of_each_update_is_the_torch_schedules_value_at_that_version(schedule):
    store = make_store(schedule)
    lrs = train(store, 0, UPDATES)
    expected_lrs, expected = torch_reference(schedule, UPDATES)
    assert lrs == pytest.approx(expected_lrs, rel=1e-12, abs=0)
    for name, value in store.snapshot():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_a_step_schedule_multiplies_the_lr_by_gamma_every_step_size_versions():
    store = make_store("step")
    assert train(store, 0, 7) == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])


def test_the_cosine_schedule_reaches_eta_min_at_t_max_versions():
    store = make_store("cosine")
    train(store, 0, 8)
    assert store.version == 8 and store.lr == pytest.approx(0.01)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_store_restored_from_a_checkpoint_continues_the_schedule_where_it_stopped(schedule, tmp_path):
    checkpoints = CheckpointDirectory(tmp_path)
    before = make_store(schedule)
    lrs = train(before, 0, 5)
    checkpoints.save(before.version, before.state_dict())
    restored = make_store(schedule)
    restored.load_state_dict(checkpoints.latest()[1])  # through torch.load(weights_only=True)
    assert restored.version == 5
    lrs += train(restored, 5, UPDATES)
    expected_lrs, expected = torch_reference(schedule, UPDATES)
    assert lrs == pytest.approx(expected_lrs, rel=1e-12, abs=0)
    for name, value in restored.snapshot():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_a_node_restarting_from_its_periodic_checkpoint_serves_the_scheduled_lr(tmp_path):
    name, kwargs = SCHEDULES["step"]

    def start() -> tuple[ParameterServer, int]:
        node = ParameterServer("ps-0")
        version = node.load(
            initial(), "sgd", LR, {"momentum": 0.9}, "async", step_timeout_s=5.0,
            checkpoints=CheckpointDirectory(tmp_path), checkpoint_every_steps=4,
            lr_schedule=name, lr_schedule_kwargs=kwargs,
        )
        return node, version

    node, version = start()
    assert version == 0
    for update in range(6):  # checkpoint at version 4; updates 4 and 5 are lost with the crash
        node.gate.push("w-0", update, gradient(update), 1, now=0.0)
    assert node.flush_checkpoints(10.0)  # the crash comes after the checkpoint's write ended
    node, version = start()
    assert version == 4 and node.gate.store.lr == pytest.approx(LR * 0.5)
    for update in range(4, UPDATES):
        node.gate.push("w-0", update, gradient(update), 1, now=0.0)
    _, expected = torch_reference("step", UPDATES)
    for tensor, value in node.gate.snapshot()[1]:
        torch.testing.assert_close(value, expected[tensor], rtol=0, atol=0)


def test_in_sync_mode_one_step_of_several_pushes_advances_the_schedule_once():
    gate = consistency_gate(make_store("step"), "sync", step_timeout_s=5.0)
    gate.push("a", 0, gradient(0), 1, 0.0)  # a alone closes step 0
    for version in range(1, 4):
        gate.push("b", version, gradient(0), 1, 0.0)
        gate.push("a", version, gradient(0), 1, 0.0)
    assert gate.version == 4 and gate.counters.updates_applied == 4
    assert gate.store.lr == pytest.approx(LR * 0.5)


@pytest.mark.parametrize("written,restored", [("step", "constant"), ("constant", "cosine"), ("step", "cosine")])
def test_a_checkpoint_written_under_another_schedule_is_refused(written, restored):
    state = make_store(written).state_dict()
    with pytest.raises(InvalidArgument, match="lr_schedule"):
        make_store(restored).load_state_dict(state)


def test_an_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError):
        ParameterStore(initial(), "sgd", LR, {}, "linear", {})


def test_a_schedule_missing_its_arguments_is_a_config_error():
    with pytest.raises(ConfigError, match="step_size"):
        ParameterStore(initial(), "sgd", LR, {}, "step", {})
