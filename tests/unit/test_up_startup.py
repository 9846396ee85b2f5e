"""`lepton up`'s start-up path: the up process itself imports no torch before the job ends; a
parameter server started beside the coordinator finds it through its ready file."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from lepton.errors import ConfigError
from lepton.ops import report
from lepton.process import write_ready_file
from lepton.tasks import REGRESSION
from ps_server.early import coordinator_from_ready_file


def test_report_names_the_regression_task_as_lepton_tasks_does():
    assert report.REGRESSION == REGRESSION


def test_the_up_process_starts_its_cluster_without_torch():
    code = (
        "import sys, lepton.ops.cli, lepton.ops.launcher, lepton.coordinator_client; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


# --- a parameter server started beside its coordinator -----------------------------------------


def test_a_server_takes_the_coordinators_address_from_its_ready_file(tmp_path):
    ready = tmp_path / "coordinator.ready.json"
    write_ready_file(str(ready), address="127.0.0.1:4711", metrics=None)
    assert coordinator_from_ready_file(ready, threading.Event(), timeout_s=5.0) == "127.0.0.1:4711"


def test_a_server_gives_up_quietly_when_the_coordinator_refused_or_it_is_stopped(tmp_path):
    ready = tmp_path / "coordinator.ready.json"
    stopped = threading.Event()
    stopped.set()
    assert coordinator_from_ready_file(ready, stopped, timeout_s=5.0) is None  # no file yet, stopped
    write_ready_file(str(ready), error="lr must be a finite number > 0, got inf")
    assert coordinator_from_ready_file(ready, threading.Event(), timeout_s=5.0) is None


def test_a_server_waits_for_the_ready_file_within_a_bound(tmp_path):
    with pytest.raises(ConfigError, match="no coordinator ready file"):
        coordinator_from_ready_file(tmp_path / "never.json", threading.Event(), timeout_s=0.0)


@pytest.mark.parametrize(
    "flags", [[], ["--coordinator", "127.0.0.1:1", "--coordinator-ready-file", "c.json"]], ids=["neither", "both"]
)
def test_lepton_ps_needs_exactly_one_way_to_find_its_coordinator(flags, capsys):
    from lepton.ops.cli import main

    assert main(["ps", *flags]) == 2
    assert "one of --coordinator and --coordinator-ready-file" in capsys.readouterr().err


def test_the_warm_up_thread_leaves_torch_dynamo_imported():
    code = "from ps_server.early import warm_optimizer; import sys; warm_optimizer().join(60); " \
           "print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stdout + done.stderr
