"""`lepton up`'s start-up path: servers and workers read the coordinator's address from its ready
file (``--coordinator-file``), and the up process itself never imports torch before the job ends."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from lepton.errors import ConfigError, Unavailable
from lepton.ops import report
from lepton.process import await_address, write_ready_file
from lepton.tasks import REGRESSION


def test_address_is_read_once_the_coordinator_writes_it(tmp_path):
    path = tmp_path / "coordinator.ready.json"
    stop = threading.Event()
    writer = threading.Timer(0.2, lambda: write_ready_file(str(path), address="127.0.0.1:4321"))
    writer.start()
    try:
        assert await_address(str(path), stop, timeout_s=30) == "127.0.0.1:4321"
    finally:
        writer.join()


def test_a_refusal_in_the_file_is_a_config_error(tmp_path):
    path = tmp_path / "coordinator.ready.json"
    write_ready_file(str(path), error="optimizer nope is unknown")
    with pytest.raises(ConfigError, match="optimizer nope is unknown"):
        await_address(str(path), threading.Event(), timeout_s=5)


def test_stop_and_timeout_end_the_wait(tmp_path):
    stop = threading.Event()
    stop.set()
    assert await_address(str(tmp_path / "never"), stop, timeout_s=5) is None
    with pytest.raises(Unavailable, match="no coordinator address"):
        await_address(str(tmp_path / "never"), threading.Event(), timeout_s=0.1)


def test_report_names_the_regression_task_as_lepton_tasks_does():
    assert report.REGRESSION == REGRESSION


def test_the_up_process_starts_its_cluster_without_torch():
    code = (
        "import sys, lepton.ops.cli, lepton.ops.launcher, lepton.coordinator_client; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stdout + done.stderr
