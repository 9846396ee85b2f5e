"""How ``lepton up`` learns why a child refused its configuration: from the child's ready file
(``lepton.ops.cli.main`` writes ``{"error", "pid"}`` there), else the last line of its log. Real
short-lived child processes stand in for the roles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lepton.errors import ConfigError
from lepton.ops.children import Child, ChildFailed, refusal, wait_ready_file


def child(tmp_path: Path, script: str) -> Child:
    log_path = tmp_path / "child.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)
    process.wait(timeout=60)
    return Child("coordinator", process, log_path)


def test_the_reason_a_child_wrote_to_its_ready_file_is_the_refusal(tmp_path):
    ready = tmp_path / "ready.json"
    script = (
        "import json, os, sys; "
        f"open({str(ready)!r}, 'w').write(json.dumps({{'error': 'no optimizer nosuch', 'pid': os.getpid()}})); "
        "print('lepton coordinator: no optimizer nosuch', file=sys.stderr); sys.exit(2)"
    )
    c = child(tmp_path, script)
    with pytest.raises(ConfigError, match="^coordinator: no optimizer nosuch$"):
        wait_ready_file(ready, c, timeout_s=5)


def test_without_a_ready_file_the_last_line_of_the_log_is_the_refusal(tmp_path):
    c = child(
        tmp_path,
        "import sys; print('noise'); print('lepton coordinator: error: bad flag', file=sys.stderr); sys.exit(2)",
    )
    error = refusal(c, tmp_path / "missing.json")
    assert str(error).startswith("coordinator: lepton coordinator: error: bad flag (log: ")


def test_a_ready_file_of_another_process_is_not_taken_for_this_ones(tmp_path):
    ready = tmp_path / "ready.json"
    ready.write_text(json.dumps({"error": "an old refusal", "pid": 1}))
    c = child(tmp_path, "import sys; print('lepton coordinator: the real reason', file=sys.stderr); sys.exit(2)")
    assert "the real reason" in str(refusal(c, ready))


def test_a_child_that_crashes_otherwise_is_not_a_configuration_error(tmp_path):
    c = child(tmp_path, "import sys; sys.exit(1)")
    with pytest.raises(ChildFailed, match="exited with 1 before it was ready"):
        wait_ready_file(tmp_path / "ready.json", c, timeout_s=5)


def test_a_coordinator_that_could_not_save_its_state_is_reported_with_its_state_directory(tmp_path):
    c = child(tmp_path, "import sys; sys.exit(161)")  # EXIT_STATE_NOT_SAVED
    c.args = ["coordinator", "--state-dir", str(tmp_path / "coordinator"), "--epochs", "1"]
    said = c.exited()
    assert said.startswith("coordinator exited with 161: it could not save its state in ")
    assert str(tmp_path / "coordinator") in said and "full" in said
    with pytest.raises(ChildFailed, match="could not save its state in"):
        wait_ready_file(tmp_path / "ready.json", c, timeout_s=5)
    c.args = []  # without a state directory the code is all there is to say
    assert c.exited() == "coordinator exited with 161"
