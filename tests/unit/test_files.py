"""Atomic file writes: the target is either the old file or the complete new one."""

from __future__ import annotations

import pytest

from lepton.files import write_atomically


def test_a_complete_write_replaces_the_target(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")
    assert write_atomically(target, lambda f: f.write(b"new")) == target
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_write_that_fails_leaves_the_old_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no half-written leftover
