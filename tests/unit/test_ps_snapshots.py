"""A parameter server carrying out checkpoint orders: capture at an exact version under the gate's
lock, misses, and the files it writes (no threads, no sockets)."""

from __future__ import annotations

import torch

from ps_server.checkpoint_files import CheckpointDirectory
from ps_server.consistency import consistency_gate
from ps_server.gate import ConsistencyGate
from ps_server.parameter_server import ParameterServer
from ps_server.store import ParameterStore

GRAD = {"w": torch.ones(2)}


def gate() -> ConsistencyGate:
    return consistency_gate(ParameterStore({"w": torch.zeros(2)}, "sgd", 0.1, {}), "async", 1.0)


def test_a_target_ahead_is_captured_when_the_version_reaches_it_and_a_passed_one_is_missed():
    g = gate()
    assert g.capture(2).state is None  # armed
    g.push("w-1", 0, GRAD, 1, 0.0)
    g.push("w-1", 1, GRAD, 1, 0.0)
    g.push("w-1", 2, GRAD, 1, 0.0)  # the store moves on to 3; the capture holds version 2
    captured = g.capture(2)
    assert captured.version == 2 and captured.state["version"] == 2
    assert torch.allclose(captured.state["params"]["w"], torch.full((2,), -0.2))
    assert g.capture(1).missed and g.capture(0).state["version"] == 3


def test_node_writes_one_file_per_order_and_reports_it_until_the_order_changes(tmp_path):
    node = ParameterServer("ps-0")
    node.load({"w": torch.zeros(2)}, "sgd", 0.1, {}, "async", 1.0, checkpoints=CheckpointDirectory(tmp_path))
    assert node.answer_checkpoint("ckpt-000001", 1) is None  # target ahead
    node.gate.push("w-1", 0, GRAD, 1, 0.0)
    report = node.answer_checkpoint("ckpt-000001", 1)
    assert report.version == 1 and report.path.endswith("snapshots/ckpt-000001.pt")
    assert node.answer_checkpoint("ckpt-000001", 1) is report
    assert torch.load(report.path, weights_only=True)["version"] == 1
    assert CheckpointDirectory(tmp_path).latest() is None  # ordered snapshots are not restart points


def test_a_server_without_a_state_dir_answers_with_an_error():
    node = ParameterServer("ps-0")
    node.load({"w": torch.zeros(2)}, "sgd", 0.1, {}, "async", 1.0)
    report = node.answer_checkpoint("ckpt-000001", 0)
    assert report.error and not report.path


def test_a_capture_owns_its_optimizer_state_so_later_updates_do_not_leak_into_it():
    """A capture at version 1 is written to disk later; Adam's moments must stay those of version 1
    while the store moves on (torch's state_dict() hands out the live tensors)."""
    g = consistency_gate(ParameterStore({"w": torch.zeros(2)}, "adam", 0.1, {}), "async", 1.0)
    assert g.capture(1).state is None  # armed
    g.push("w-1", 0, GRAD, 1, 0.0)
    at_one = ParameterStore({"w": torch.zeros(2)}, "adam", 0.1, {})
    at_one.apply(GRAD)
    expected = at_one.state_dict()["optimizer"]["state"][0]["exp_avg"].clone()
    g.push("w-1", 1, {"w": torch.full((2,), 5.0)}, 1, 0.0)  # version 2 changes the moments in place
    captured = g.capture(1).state["optimizer"]["state"][0]
    assert torch.equal(captured["exp_avg"], expected)
    assert int(captured["step"]) == 1
