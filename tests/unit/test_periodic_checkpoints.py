"""Periodic checkpoints are written on a writer thread of their own: a push never waits for the
disk, an interval that comes during a write is coalesced into one later write of the newest state,
what is written is the state at its version (a copy, not the live tensors), and closing flushes.
Writes are held back with events (waits bounded by deadlines), never timed with sleeps."""

from __future__ import annotations

import threading

import torch

from ps_server.checkpoint_files import CheckpointDirectory
from ps_server.parameter_server import ParameterServer
from ps_server.periodic_checkpoints import copy_into
from ps_server.store import ParameterStore

GRAD = {"w": torch.ones(3)}
WAIT_S = 10.0


def loaded(directory, every_steps: int = 2, optimizer: str = "adam") -> ParameterServer:
    node = ParameterServer("ps-0")
    node.load(
        {"w": torch.zeros(3)}, optimizer, 0.1, {}, "async", 1.0,
        checkpoints=CheckpointDirectory(directory), checkpoint_every_steps=every_steps,
    )
    return node


def push(node: ParameterServer, times: int) -> None:
    for _ in range(times):
        node.gate.push("w-1", node.gate.version, GRAD, 1, 0.0)


class HeldWrites:
    """Wraps a CheckpointDirectory's ``save``: each write waits until ``release`` is set."""

    def __init__(self, directory: CheckpointDirectory) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.versions: list[int] = []
        self._save = directory.save
        directory.save = self  # type: ignore[method-assign]

    def __call__(self, version, state):
        self.versions.append(version)
        self.started.set()
        assert self.release.wait(WAIT_S), "the test never released the write"
        return self._save(version, state)


def reference_state(updates: int) -> dict:
    store = ParameterStore({"w": torch.zeros(3)}, "adam", 0.1, {})
    for _ in range(updates):
        store.apply(GRAD)
    return store.state_dict()


def test_pushes_go_on_while_a_checkpoint_is_written_and_intervals_meanwhile_coalesce_into_one(tmp_path):
    node = loaded(tmp_path)
    held = HeldWrites(node._checkpoints)
    push(node, 2)  # version 2: an interval, its write starts and is held
    assert held.started.wait(WAIT_S)
    push(node, 7)  # versions 4, 6 and 8 come while it is written: not waited for
    assert node.gate.version == 9
    assert node.checkpoint_tally.coalesced == 3
    held.release.set()
    assert node.flush_checkpoints(WAIT_S)
    assert held.versions == [2, 9]  # the held write, then one write of the state as it was then
    assert node.checkpoint_version == 9
    assert CheckpointDirectory(tmp_path).versions() == [2, 9]


def test_a_checkpoint_holds_the_state_at_its_version_not_what_came_after(tmp_path):
    node = loaded(tmp_path)
    held = HeldWrites(node._checkpoints)
    push(node, 2)
    assert held.started.wait(WAIT_S)
    push(node, 1)  # version 3 changes the live parameters and moments while version 2 is written
    held.release.set()
    assert node.flush_checkpoints(WAIT_S)
    version, state = CheckpointDirectory(tmp_path).latest()
    expected = reference_state(2)
    assert version == 2 and state["version"] == 2
    assert torch.equal(state["params"]["w"], expected["params"]["w"])
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], expected["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg_sq"], expected["optimizer"]["state"][0]["exp_avg_sq"])


def test_a_restart_from_a_background_checkpoint_continues_exactly(tmp_path):
    node = loaded(tmp_path)
    push(node, 4)
    assert node.close(WAIT_S)
    restarted = loaded(tmp_path)
    assert restarted.gate.version == 4
    push(restarted, 1)
    _, tensors = restarted.gate.snapshot(["w"])
    assert torch.equal(tensors[0][1], reference_state(5)["params"]["w"])
    restarted.close(WAIT_S)


def test_close_finishes_the_write_in_flight_and_takes_no_more_intervals(tmp_path):
    node = loaded(tmp_path)
    held = HeldWrites(node._checkpoints)
    push(node, 2)
    assert held.started.wait(WAIT_S)
    release_later = threading.Timer(0.0, held.release.set)  # released while close() waits
    closer = threading.Thread(target=lambda: results.append(node.close(WAIT_S)))
    results: list[bool] = []
    closer.start()
    release_later.start()
    closer.join(WAIT_S)
    assert results == [True]
    push(node, 2)  # after close: applied, not checkpointed
    assert node.gate.version == 4 and held.versions == [2]
    assert CheckpointDirectory(tmp_path).versions() == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000000002.pt"]


def test_a_reload_finishes_the_previous_writes_before_it_reads_the_newest_checkpoint(tmp_path):
    node = loaded(tmp_path)
    held = HeldWrites(node._checkpoints)
    push(node, 2)
    assert held.started.wait(WAIT_S)
    threading.Timer(0.0, held.release.set).start()
    version = node.load(
        {"w": torch.zeros(3)}, "adam", 0.1, {}, "async", 1.0,
        checkpoints=CheckpointDirectory(tmp_path), checkpoint_every_steps=2,
    )
    assert version == 2
    node.close(WAIT_S)


def test_a_write_cut_short_leaves_a_temporary_file_that_the_next_load_removes(tmp_path):
    (tmp_path / "ckpt-000000000004.pt.tmp").write_bytes(b"torn")
    node = loaded(tmp_path)
    push(node, 2)
    assert node.close(WAIT_S)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000000002.pt"]


def test_staging_reuses_its_tensors_and_copies_values():
    live = {"version": 1, "params": {"w": torch.ones(4)}, "optimizer": {"state": {0: {"m": torch.ones(4)}},
                                                                        "param_groups": [{"lr": 0.1, "params": [0]}]}}
    first = copy_into(live, None)
    live["params"]["w"].add_(1)
    assert torch.equal(first["params"]["w"], torch.ones(4))  # a copy, not the live tensor
    second = copy_into(live, first)
    assert second["params"]["w"] is first["params"]["w"]  # the same buffer, refilled
    assert torch.equal(second["params"]["w"], torch.full((4,), 2.0))
    assert second["optimizer"]["param_groups"] is not live["optimizer"]["param_groups"]
    reshaped = copy_into({"w": torch.ones(2)}, first["params"])
    assert reshaped["w"] is not first["params"]["w"] and reshaped["w"].shape == (2,)
