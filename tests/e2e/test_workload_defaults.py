"""``lepton up --dataset synthetic-image`` with no other flag trains the workload at its recommended
settings (``lepton.config.RECOMMENDED``) to the single-process reference's accuracy.

The CI-sized half of ``bench/reference.py --lepton``: one workload at its defaults (the full
90,000-sample data set; a smaller one would not be what ``--dataset synthetic-image`` means), one
Lepton run, compared with the reference's accuracy as recorded rather than retrained here. The
reference (``python bench/reference.py --dataset synthetic-image``: 3 epochs, batch 128, Adam lr
0.001 in one process) is deterministic for a given torch build: 0.9021 at seed 0, and 0.8948-0.9021
over seeds 0-2. ``bench/reference.py --lepton`` compares both workloads, retraining the reference.
"""

from __future__ import annotations

import pytest

from lepton.config import RECOMMENDED
from support import lepton_argv, read_json, tagged_pids

pytestmark = pytest.mark.e2e
REFERENCE_ACCURACY = 0.9021  # seed 0, bench/reference.py --dataset synthetic-image
# The reference minus 1.2 points. Lepton's async runs differed from their references by -0.90 to
# +0.15 pt (bench/reference.py's table); this test's command gave 0.8920 at load average 19-25 and
# 0.8984 at 11-13 (two busy loops beside it both times).
ACCURACY_FLOOR = 0.89
RUN_TIMEOUT_S = 400  # a liveness bound: about 40-60 s on 2 quiet cores


def test_synthetic_image_on_its_defaults_reaches_the_reference_accuracy(processes, tmp_path):
    report_path = tmp_path / "report.json"
    up = processes.start(
        "up",
        lepton_argv(
            "up", "--dataset", "synthetic-image", "--report", str(report_path), "--state-dir", str(tmp_path / "state")
        ),
    )
    up.wait(timeout=RUN_TIMEOUT_S)
    report = read_json(report_path)
    assert report is not None, processes.log("up")
    assert up.returncode == 0 and report["status"] == "succeeded", processes.log("up")[-4000:]
    # the report shows the settings the job ran with: the workload's, not JobSpec's defaults
    settings = {name: report[name] for name in ("model", "epochs", "batch_size", "optimizer", "lr")}
    assert settings == dict(RECOMMENDED["synthetic-image"])
    assert report["mode"] == "async" and report["shards_per_epoch"] == 12
    assert report["test_accuracy"] >= ACCURACY_FLOOR, (report["test_accuracy"], REFERENCE_ACCURACY)
    assert tagged_pids(processes.tag) == []
