"""Where the seconds before training go: one ``lepton up`` from its start to its first completed shard.

What is measured:
    The script starts ``lepton up`` (the ``lepton`` beside this interpreter, or ``--lepton``) with a
    fresh state directory and JSON child logs, notes the wall-clock time just before the spawn, and
    follows the children's logs. Every phase is the time from that spawn to the first log line of
    an event (``coordinator_serving``, ``ps_registered``, ``assignment_loaded``,
    ``worker_registered``, ``shard_started``, ``shard_completed``); a child's log timestamp is its
    own wall clock, the same clock on one machine. Once the first shard is completed it sends
    SIGTERM to ``lepton up`` and waits for it (and so for its children) to exit, so that runs do not
    overlap.

    The first ``shard_started`` is the first training step's start: the job is TRAINING (the
    coordinator leases only then) and a worker holds a lease. The interpreter start, the imports of
    every process and the building of data sets and models are all inside.

How to run::

    python bench/startup.py                          # synthetic-image, 2 workers x 1 server, 5 runs
    python bench/startup.py --runs 1 --json startup.json
    python bench/startup.py --lepton /path/to/other/.venv/bin/lepton   # another checkout, same job
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

PHASES = ("coordinator_serving", "ps_registered", "assignment_loaded", "worker_registered", "shard_started",
          "shard_completed")
RUN_TIMEOUT_S = 120.0


def lepton_command(given: str | None) -> list[str]:
    if given:
        return [given]
    script = Path(sys.executable).with_name("lepton")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lepton"]


def first_events(log_dir: Path) -> dict[str, float]:
    """Each phase's first timestamp (epoch seconds) across every child's JSON log."""
    seen: dict[str, float] = {}
    for path in log_dir.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            event = record.get("event") if isinstance(record, dict) else None
            if event in PHASES and "timestamp" in record:
                at = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
                seen[event] = min(seen.get(event, at), at)
    return seen


def one_run(lepton: list[str], job: list[str], workers: int, servers: int) -> dict[str, float]:
    """Seconds from spawning ``lepton up`` to each phase, and to its exit after SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="lepton-startup-") as tmp:
        state = Path(tmp) / "up"
        command = [*lepton, "up", "--workers", str(workers), "--ps", str(servers), "--state-dir", str(state),
                   "--log-format", "json", *job]
        spawned = time.time()
        up = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            seen: dict[str, float] = {}
            while "shard_completed" not in seen and up.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # polling the logs; the phases' times come from the logs, not this loop
                if (state / "logs").is_dir():
                    seen = first_events(state / "logs")
            stopping = time.time()
        finally:
            if up.poll() is None:
                up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        if "shard_completed" not in seen:
            raise RuntimeError(f"lepton up ended or timed out before the first shard completed: {command}")
        result = {phase: round(seen[phase] - spawned, 3) for phase in PHASES if phase in seen}
        result["stopped"] = round(time.time() - stopping, 3)
        return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ps", type=int, default=1)
    p.add_argument("--dataset", default="synthetic-image")
    p.add_argument("--lepton", default=None, help="the lepton command to run (default: beside this python)")
    p.add_argument("--json", default=None, help="write every run's phases here")
    args = p.parse_args(argv)
    lepton = lepton_command(args.lepton)
    job = ["--dataset", args.dataset, "--mode", "async"]
    runs = []
    for i in range(args.runs):
        run = one_run(lepton, job, args.workers, args.ps)
        runs.append(run)
        print(f"run {i + 1}: " + "  ".join(f"{k} {v:.2f}" for k, v in run.items()), flush=True)
    print(f"\nseconds from `lepton up` to the first of each event ({args.dataset}, {args.workers} workers x "
          f"{args.ps} servers; median [min-max] of {len(runs)}; load average {os.getloadavg()[0]:.1f}):")
    for phase in (*PHASES, "stopped"):
        values = [r[phase] for r in runs if phase in r]
        if values:
            print(f"  {phase:<20} {statistics.median(values):6.2f}  [{min(values):.2f}-{max(values):.2f}]")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
