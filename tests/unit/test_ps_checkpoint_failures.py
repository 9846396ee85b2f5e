"""A parameter server whose periodic checkpoint cannot be written (disk full, file too large, the
directory gone) counts the failure, logs it once for that write and applies the update: the push
that triggered the checkpoint succeeds and training goes on (no sockets; the writer thread is
flushed before each check)."""

from __future__ import annotations

import errno
import resource
import shutil

import torch

from ps_server import checkpoint_files as checkpoint_module
from ps_server.checkpoint_files import CheckpointDirectory
from ps_server.parameter_server import ParameterServer

GRAD = {"w": torch.ones(2)}


def loaded(directory) -> ParameterServer:
    node = ParameterServer("ps-0")
    node.load(
        {"w": torch.zeros(2)}, "sgd", 0.1, {}, "async", 1.0,
        checkpoints=CheckpointDirectory(directory), checkpoint_every_steps=2,
    )
    return node


def push(node: ParameterServer, times: int) -> None:
    """``times`` pushes, each waiting for the checkpoint it triggers (so each interval is written)."""
    for _ in range(times):
        node.gate.push("w-1", node.gate.version, GRAD, 1, 0.0)
        assert node.flush_checkpoints(10.0)


def test_a_full_disk_fails_the_checkpoint_not_the_push_and_the_next_interval_writes_again(tmp_path, monkeypatch):
    node = loaded(tmp_path)
    real = checkpoint_module.files.write_atomically

    def disk_full(final, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.files, "write_atomically", disk_full)
    push(node, 4)  # versions 2 and 4 are checkpoint intervals: both fail
    assert node.gate.version == 4
    assert node.status().checkpoints_failed == 2 and node.checkpoint_version == -1
    monkeypatch.setattr(checkpoint_module.files, "write_atomically", real)
    push(node, 2)
    assert node.checkpoint_version == 6 and CheckpointDirectory(tmp_path).latest()[0] == 6
    assert node.status().checkpoints_failed == 2


def test_a_file_size_limit_that_binds_root_fails_the_checkpoint_not_the_push(tmp_path, capsys):
    node = loaded(tmp_path)  # capsys: the log line goes to memory, not to pytest's capture file
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, hard))  # EFBIG after 16 bytes, root included
    try:
        push(node, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert node.gate.version == 2 and node.status().checkpoints_failed == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no torn or temporary file left
    assert capsys.readouterr().out.count("checkpoint_failed") == 1


def test_a_checkpoint_directory_replaced_by_a_file_fails_the_checkpoint_not_the_push(tmp_path):
    directory = tmp_path / "checkpoints"
    node = loaded(directory)
    shutil.rmtree(directory)
    directory.write_text("not a directory")
    push(node, 2)
    assert node.gate.version == 2 and node.status().checkpoints_failed == 1
