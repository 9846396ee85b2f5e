"""Shared-memory segments (lepton/shm.py) and a server's sessions (ps_server/shm_sessions.py),
driven directly: segments in a temporary directory, a ParameterServer in async mode."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from lepton import shm
from lepton.errors import FailedPrecondition, Fenced, InvalidArgument, NotFound, ResourceExhausted
from ps_server.parameter_server import ParameterServer
from ps_server.roster import WorkerEntry
from ps_server.shm_sessions import SharedMemorySessions

W, INC = "worker-0", 1
LR = 0.5


def test_placements_are_aligned_after_the_head_and_the_size_holds_them():
    placed, size = shm.place([("a", torch.float32, (3,)), ("b", torch.float64, (2, 2)), ("c", torch.int8, (0,))])
    assert [p.offset_bytes for p in placed] == [64, 128, 192]
    assert size == 192 and all(p.offset_bytes % shm.ALIGN_BYTES == 0 for p in placed)


def test_a_segment_is_private_carries_a_nonce_and_attaches_only_at_its_own_size(tmp_path):
    name = shm.new_name("g")
    seg = shm.Segment.create(name, 256, tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    other = shm.Segment.attach(name, 256, tmp_path)
    assert other.nonce == seg.nonce and len(seg.nonce) == shm.NONCE_BYTES
    (view,) = seg.views([shm.Placement("t", torch.float32, (4,), 64)])
    (seen,) = other.views([shm.Placement("t", torch.float32, (4,), 64)])
    view.copy_(torch.arange(4.0))
    assert torch.equal(seen, torch.arange(4.0))  # one memory, two mappings
    with pytest.raises(shm.SegmentError, match="not a 512-byte segment"):
        shm.Segment.attach(name, 512, tmp_path)
    with pytest.raises(shm.SegmentError, match="cannot open"):
        shm.Segment.attach(shm.new_name("p"), 256, tmp_path)  # another host: no such name here
    with pytest.raises(shm.SegmentError, match="does not fit"):
        seg.views([shm.Placement("t", torch.float32, (64,), 64)])
    seg.unlink()
    assert not (tmp_path / name).exists()
    assert torch.equal(seen, torch.arange(4.0))  # mappings outlive the name


def test_a_file_without_the_head_is_not_attached(tmp_path):
    name = shm.new_name("g")
    (tmp_path / name).write_bytes(bytes(256))
    with pytest.raises(shm.SegmentError, match="segment head"):
        shm.Segment.attach(name, 256, tmp_path)


def test_create_fails_cleanly_without_the_directory(tmp_path):
    with pytest.raises(shm.SegmentError, match="cannot create"):
        shm.Segment.create(shm.new_name("g"), 256, tmp_path / "missing")


def test_sweep_removes_the_segments_of_a_killed_process_and_keeps_live_ones(tmp_path):
    code = (
        "import os, signal, sys; from pathlib import Path; from lepton import shm; "
        f"shm.Segment.create(shm.new_name('g'), 128, Path({str(tmp_path)!r})); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, check=False)
    assert proc.returncode == -9
    leftover = [p.name for p in tmp_path.iterdir()]
    assert len(leftover) == 1 and leftover[0].startswith(shm.PREFIX)
    mine = shm.Segment.create(shm.new_name("g"), 128, tmp_path)
    assert shm.sweep(tmp_path) == leftover
    assert [p.name for p in tmp_path.iterdir()] == [mine.name]


# --- sessions -------------------------------------------------------------------------------------


def node_with(tensors, sparse=()) -> ParameterServer:
    node = ParameterServer("ps-0")
    node.load(tensors, "sgd", LR, {}, "async", 10.0, sparse=sparse)
    node.update_roster([WorkerEntry(W, INC, True)])
    return node


@pytest.fixture
def served(tmp_path):
    node = node_with({"w": torch.zeros(3, 4), "b": torch.ones(4)})
    sessions = SharedMemorySessions(node, directory=tmp_path)
    yield node, sessions, tmp_path
    sessions.close_all()


def attach(info, directory):
    grads = shm.Segment.attach(info.gradients_segment, info.segment_bytes, directory)
    params = shm.Segment.attach(info.parameters_segment, info.segment_bytes, directory)
    return grads, params, grads.nonce + params.nonce


def test_a_step_reads_gradients_in_place_and_writes_the_parameters_back(served):
    node, sessions, directory = served
    info = sessions.open(W, INC)
    assert [p.name for p in info.tensors] == ["w", "b"]
    grads, params, nonce = attach(info, directory)
    gw, gb = grads.views(info.tensors)
    gw.fill_(1.0)
    gb.fill_(2.0)
    result, version = sessions.push_pull(info.session_id, nonce, W, INC, 0, 1, [0, 1], 2, 5.0, "r1")
    assert result.version == version == 1
    pw, pb = params.views(info.tensors)
    assert torch.equal(pw, torch.full((3, 4), -LR)) and torch.equal(pb, torch.zeros(4))
    assert sorted(os.listdir(directory)) == []  # confirmed: names unlinked, mappings kept
    # a retry with the same request id is answered from memory, not applied again
    result, version = sessions.push_pull(info.session_id, nonce, W, INC, 0, 1, [0, 1], 2, 5.0, "r1")
    assert version == 1 and node.status().updates_applied == 1
    # only the listed tensors are pushed
    _, version = sessions.push_pull(info.session_id, nonce, W, INC, 1, 1, [1], 1, 5.0, "r2")
    assert version == 2 and torch.equal(pw, torch.full((3, 4), -LR)) and torch.equal(pb, torch.full((4,), -1.0))


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(nonce=bytes(32)), FailedPrecondition),
        (dict(session_id="nope"), NotFound),
        (dict(incarnation=2), NotFound),
        (dict(indices=[0, 0]), InvalidArgument),
        (dict(indices=[2]), InvalidArgument),
        (dict(said=1), InvalidArgument),
        (dict(samples=0), InvalidArgument),
        (dict(base_version=-1), InvalidArgument),
    ],
    ids=["wrong-nonce", "unknown-session", "other-incarnation", "repeated-index", "index-out-of-range",
         "count-mismatch", "no-samples", "negative-version"],
)
def test_bad_steps_are_refused_and_change_nothing(served, change, error):
    node, sessions, directory = served
    info = sessions.open(W, INC)
    grads, params, nonce = attach(info, directory)
    for v in grads.views(info.tensors):
        v.fill_(1.0)
    args = dict(session_id=info.session_id, nonce=nonce, incarnation=INC, base_version=0, samples=1,
                indices=[0, 1], said=2)
    args.update(change)
    with pytest.raises(error):
        sessions.push_pull(args["session_id"], args["nonce"], W, args["incarnation"], args["base_version"],
                           args["samples"], args["indices"], args["said"], 5.0, "r")
    assert node.status().version == 0 and node.status().updates_applied == 0
    assert torch.equal(node.pull(W, INC, ["w"])[1][0][1], torch.zeros(3, 4))
    if change.get("nonce") is not None:
        assert len(os.listdir(directory)) == 2  # not confirmed: the names stay until the session ends


def test_nonfinite_gradients_in_the_segment_are_refused_and_nothing_changes(served):
    node, sessions, directory = served
    info = sessions.open(W, INC)
    grads, _, nonce = attach(info, directory)
    gw, gb = grads.views(info.tensors)
    gw.fill_(float("nan"))
    with pytest.raises(InvalidArgument):
        sessions.push_pull(info.session_id, nonce, W, INC, 0, 1, [0, 1], 2, 5.0, "r")
    assert node.status().updates_applied == 0 and node.status().pushes_rejected == 1


def test_sessions_end_with_their_member_and_another_open(served):
    node, sessions, directory = served
    first = sessions.open(W, INC)
    second = sessions.open(W, INC)
    assert len(sessions) == 1 and sorted(os.listdir(directory)) == sorted(
        [second.gradients_segment, second.parameters_segment]
    )
    with pytest.raises(NotFound):  # the older session ended (checked before its nonce)
        sessions.push_pull(first.session_id, bytes(32), W, INC, 0, 1, [], 0, 5.0)
    node.update_roster([WorkerEntry(W, INC, False)])  # declared dead: fenced
    assert len(sessions) == 0 and os.listdir(directory) == []
    with pytest.raises(Fenced):
        sessions.open(W, INC)


def test_a_session_is_refused_when_turned_off_with_sparse_tensors_or_without_room(tmp_path):
    node = node_with({"w": torch.zeros(2)})
    with pytest.raises(FailedPrecondition, match="turned off"):
        SharedMemorySessions(node, enabled=False, directory=tmp_path).open(W, INC)
    with pytest.raises(ResourceExhausted, match="shared memory"):
        SharedMemorySessions(node, directory=tmp_path / "missing").open(W, INC)
    sparse = node_with({"e": torch.zeros(4, 2)}, sparse=["e"])
    with pytest.raises(FailedPrecondition, match="row-sparse"):
        SharedMemorySessions(sparse, directory=tmp_path).open(W, INC)
    assert os.listdir(tmp_path) == []


def test_close_all_leaves_no_segment(served):
    node, sessions, directory = served
    sessions.open(W, INC)
    assert len(os.listdir(directory)) == 2
    sessions.close_all()
    assert os.listdir(directory) == [] and len(sessions) == 0


def test_close_is_for_the_sessions_own_member_and_refuses_strangers(served):
    node, sessions, directory = served
    info = sessions.open(W, INC)
    with pytest.raises(NotFound):
        sessions.close_member("stranger", 1, info.session_id)
    sessions.close_member(W, INC, "unknown-session")  # idempotent
    assert len(sessions) == 1
    sessions.close_member(W, INC, info.session_id)
    assert len(sessions) == 0 and os.listdir(directory) == []
