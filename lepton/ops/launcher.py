"""``lepton up``: a whole cluster as separate OS processes on loopback, then its report.

``lepton.ops.supervisor`` starts and watches the children; ``lepton.ops.report`` turns what it saw
into the summary and the JSON report.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from lepton.ops.cluster import Cluster
from lepton.ops.curves import write_png
from lepton.ops.report import make_report, publish
from lepton.ops.supervisor import Supervisor
from lepton.process import EXIT_CONFIG, EXIT_JOB_FAILED, EXIT_OK, stop_event_on_signals


def run_up(cluster: Cluster, report_path: str | None, timeout_s: float) -> int:
    """Runs the cluster until its job ends (or Ctrl-C, SIGTERM, ``timeout_s``), stops every child,
    and reports; the exit code says how the job ended."""
    state_dir = Path(cluster.state_dir or tempfile.mkdtemp(prefix="lepton-up-"))
    supervisor = Supervisor(cluster, state_dir, stop_event_on_signals())
    seen = supervisor.run(timeout_s)
    wall_s = time.monotonic() - supervisor.started
    report = make_report(seen, cluster, supervisor.children, wall_s, state_dir)
    curves_note = ""
    if seen.curves is not None:
        seen.curves.close()
        report["tensorboard_dir"] = str(seen.curves.logdir)
        report["curves_png"] = None
        if report_path and seen.curves.series:
            png = Path(report_path).with_suffix(".png")
            curves_note = write_png(seen.curves.series, png)
            report["curves_png"] = str(png) if png.exists() else None
    publish(report, report_path, seen.refused)
    if curves_note:
        print(curves_note, flush=True)
    if seen.refused:
        # Last, so that it is the line a person sees: the job never started.
        print(f"lepton up: {seen.refused}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    return EXIT_OK if seen.outcome == "succeeded" else EXIT_JOB_FAILED
