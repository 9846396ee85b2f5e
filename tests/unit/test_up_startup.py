"""`lepton up`'s start-up path: the up process itself imports no torch before the job ends; a
parameter server warms its optimizer on a thread."""

from __future__ import annotations

import subprocess
import sys

from lepton.ops import report
from lepton.tasks import REGRESSION


def test_report_names_the_regression_task_as_lepton_tasks_does():
    assert report.REGRESSION == REGRESSION


def test_the_up_process_starts_its_cluster_without_torch():
    code = (
        "import sys, lepton.ops.cli, lepton.ops.launcher, lepton.coordinator_client; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_the_warm_up_thread_leaves_torch_dynamo_imported():
    code = "from ps_server.early import warm_optimizer; import sys; warm_optimizer().join(60); " \
           "print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stdout + done.stderr
