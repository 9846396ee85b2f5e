"""State directories are checked before a role registers or serves: created if missing, writable,
fsync-able; anything else is a ConfigError naming the path (the CLI turns it into exit 2)."""

from __future__ import annotations

import os
import resource

import pytest

from lepton.errors import ConfigError
from lepton.files import check_state_dir


def test_a_missing_state_directory_is_created_and_left_without_the_probe(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_state_dir(target) == target
    assert target.is_dir() and list(target.iterdir()) == []


def test_a_regular_file_is_refused_naming_the_path(tmp_path):
    target = tmp_path / "state"
    target.write_text("not a directory")
    with pytest.raises(ConfigError, match=f"state directory {target} is not a directory"):
        check_state_dir(target)
    assert target.read_text() == "not a directory"


def test_a_path_under_a_regular_file_is_refused_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "state"
    with pytest.raises(ConfigError, match=f"state directory {target} cannot be created"):
        check_state_dir(target)


def test_a_directory_that_refuses_writes_is_refused_naming_the_path(tmp_path):
    # Root ignores mode bits, so the refusal comes from a file size limit of 0 bytes (EFBIG), which
    # binds root too; restored before the test ends.
    target = tmp_path / "state"
    target.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        with pytest.raises(ConfigError, match=f"state directory {target} is not writable: File too large"):
            check_state_dir(target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(target.iterdir()) == []  # no probe left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through mode bits")
def test_a_read_only_directory_is_refused_for_an_ordinary_user(tmp_path):
    target = tmp_path / "state"
    target.mkdir()
    target.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=f"state directory {target} is not writable"):
            check_state_dir(target)
    finally:
        target.chmod(0o700)
