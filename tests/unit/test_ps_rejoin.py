"""A parameter server fenced while alive: reclaim the id or step aside; keep state or reload."""

from __future__ import annotations

import torch

from lepton.tensors import TensorSpec
from ps_server.rejoin import AfterFence, after_fence, keeps_state


def test_a_server_declared_dead_reclaims_its_id():
    known = [("ps-0", 1), ("ps-1", 1), ("worker-0", 3)]
    assert after_fence("ps-0", 1, known) is AfterFence.REJOIN


def test_a_server_whose_id_a_newer_incarnation_holds_steps_aside():
    assert after_fence("ps-0", 1, [("ps-0", 2), ("ps-1", 1)]) is AfterFence.STEP_ASIDE


def test_a_server_the_coordinator_forgot_reclaims_its_id():
    assert after_fence("ps-0", 4, [("ps-1", 1)]) is AfterFence.REJOIN


def served(**shapes: tuple[int, ...]) -> dict[str, TensorSpec]:
    return {n: TensorSpec(n, torch.float32, s) for n, s in shapes.items()}


def test_the_same_tensors_keep_the_live_state():
    assigned = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    assert keeps_state(served(w=(4, 3), b=(3,)), assigned)


def test_other_tensors_or_nothing_loaded_mean_a_fresh_load():
    assigned = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    assert not keeps_state(None, assigned)
    assert not keeps_state(served(w=(4, 3)), assigned)
    assert not keeps_state(served(w=(5, 3), b=(3,)), assigned)
    wider = {"w": torch.zeros(4, 3), "b": torch.zeros(3, dtype=torch.float64)}
    assert not keeps_state(served(w=(4, 3), b=(3,)), wider)
