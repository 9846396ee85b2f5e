"""A role given a state directory it cannot use exits 2 at once with one line naming the path,
before it registers or serves. Real ``lepton`` processes.

Tests run as root here, and root writes through mode bits, so "cannot write" is made in ways that
bind root too: a regular file where the directory should be, a file size limit of 0 bytes
(RLIMIT_FSIZE: every write fails with EFBIG), and a tmpfs mounted read-only where mounting works.
"""

from __future__ import annotations

import resource
import subprocess
import time

import pytest

from support import lepton_argv

pytestmark = pytest.mark.e2e
REFUSAL_DEADLINE_S = 20.0
# Nothing listens here: a server that reached registration would retry for a minute, not exit 2.
NO_COORDINATOR = "127.0.0.1:1"


def run(argv: list[str], *, file_size_limit: int | None = None) -> tuple[int, str, float]:
    def limit() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    return proc.returncode, proc.stderr, time.monotonic() - started


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_a_coordinator_whose_state_dir_is_a_regular_file_exits_2_naming_it(tmp_path):
    state = tmp_path / "state"
    state.write_text("I am a file")
    code, stderr, elapsed_s = run(lepton_argv("coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(state)))
    assert code == 2, stderr
    assert last_line(stderr) == f"lepton coordinator: state directory {state} is not a directory"
    assert "Traceback" not in stderr and elapsed_s < REFUSAL_DEADLINE_S
    assert state.read_text() == "I am a file"


def test_a_parameter_server_whose_state_dir_refuses_writes_exits_2_before_registering(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    code, stderr, elapsed_s = run(
        lepton_argv("ps", "--coordinator", NO_COORDINATOR, "--listen", "127.0.0.1:0", "--state-dir", str(state)),
        file_size_limit=0,
    )
    assert code == 2, stderr
    assert last_line(stderr) == f"lepton ps: state directory {state} is not writable: File too large"
    assert "Traceback" not in stderr and elapsed_s < REFUSAL_DEADLINE_S


def test_a_parameter_server_under_a_regular_file_exits_2_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    state = tmp_path / "file" / "state"
    code, stderr, _ = run(
        lepton_argv("ps", "--coordinator", NO_COORDINATOR, "--listen", "127.0.0.1:0", "--state-dir", str(state))
    )
    assert code == 2, stderr
    assert last_line(stderr).startswith(f"lepton ps: state directory {state} cannot be created")


def test_a_parameter_server_on_a_read_only_file_system_exits_2_naming_the_path(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        code, stderr, _ = run(
            lepton_argv("ps", "--coordinator", NO_COORDINATOR, "--listen", "127.0.0.1:0", "--state-dir", str(mount))
        )
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert code == 2, stderr
    assert last_line(stderr) == f"lepton ps: state directory {mount} is not writable: Read-only file system"
