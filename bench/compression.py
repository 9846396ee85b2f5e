"""Gradient compression, side by side in one interleaved run: ``lepton up`` with 2 workers and 1
parameter server (async) trains the same job with each JobSpec.gradient_compression (none, fp16,
bf16, topk, sign), same seed, data and batches; every process runs one intra-op thread
(``OMP_NUM_THREADS=1``, as bench/training.py).

Per setting: bytes pushed per step (the server's ``bytes_pushed`` over its ``pushes_received``,
from the report's final server status: gradient bytes as they travelled, encoded ones encoded),
the saving against uncompressed (raw bytes / these bytes), samples/s (the coordinator's
samples_trained / training_seconds) and the final test accuracy, with its difference from
uncompressed. Repetitions are interleaved (none, fp16, ..., none, fp16, ...); the table gives
medians and [min-max].

How to run::

    python bench/compression.py                       # synthetic-image, 2 repetitions
    python bench/compression.py --runs 3 --topk-ratio 0.05 --json compression.json
    python bench/compression.py --quick               # digits, 1 epoch, 1 repetition (the smoke test)
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch: one intra-op thread in this and every child process

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

COMPRESSIONS = ("none", "fp16", "bf16", "topk", "sign")


def run_one(dataset: str, epochs: int | None, compression: str, topk_ratio: float, timeout_s: float) -> dict:
    """One ``lepton up`` with this compression; its report's figures."""
    from reference import lepton_command
    from training import job

    spec = job(dataset, epochs)
    explicit = {"epochs"} if epochs is not None else set()
    tmp = Path(tempfile.mkdtemp(prefix="lepton-compression-"))
    report_path = tmp / "report.json"
    command = lepton_command(spec, explicit, 2, report_path, tmp / "state", timeout_s)
    command += ["--gradient-compression", compression, "--topk-ratio", repr(topk_ratio)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(tmp / "up.log", "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s + 60)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if report.get("status") != "succeeded":
        raise RuntimeError(f"lepton up with {compression}: {report.get('status', 'no report')} (logs in {tmp})")
    (server,) = report["parameter_server_status"].values()
    shutil.rmtree(tmp, ignore_errors=True)
    pushes = int(server["pushes_received"])
    return {
        "compression": compression,
        "samples": report["samples_trained"],
        "seconds": report["training_seconds"],
        "samples_per_second": report["samples_trained"] / max(report["training_seconds"], 1e-9),
        "accuracy": report["test_accuracy"],
        "pushes": pushes,
        "bytes_per_push": int(server["bytes_pushed"]) / max(pushes, 1),
    }


def _cell(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="synthetic-image")
    p.add_argument("--runs", type=int, default=2, help="repetitions of each setting")
    p.add_argument("--epochs", type=int, default=None, help="override the data set's epochs")
    p.add_argument("--compressions", default=",".join(COMPRESSIONS), help="comma-separated settings to compare")
    p.add_argument("--topk-ratio", type=float, default=0.01, help="topk: fraction of each tensor's elements sent")
    p.add_argument("--quick", action="store_true", help="digits, 1 epoch, 1 repetition")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each `lepton up` may take")
    p.add_argument("--json", default=None, help="write every repetition here")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.epochs, args.runs = "digits", 1, 1
    kinds = [c.strip() for c in args.compressions.split(",") if c.strip()]
    unknown = sorted(set(kinds) - set(COMPRESSIONS))
    if unknown:
        p.error(f"unknown compressions {unknown}; choose from {COMPRESSIONS}")
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for i in range(args.runs):
        for kind in kinds:
            result = run_one(args.dataset, args.epochs, kind, args.topk_ratio, args.timeout)
            runs[kind].append(result)
            print(f"{args.dataset} run {i + 1} {kind}: {result['bytes_per_push']:,.0f} B/push, "
                  f"{result['samples_per_second']:,.0f} samples/s, accuracy {result['accuracy']:.4f}", flush=True)
    base = runs.get("none")
    raw = statistics.median(r["bytes_per_push"] for r in base) if base else None
    base_acc = statistics.median(r["accuracy"] for r in base) if base else None
    print(f"\n{args.dataset}, 2 workers x 1 server, async; topk_ratio {args.topk_ratio}; one intra-op thread per "
          f"process; median [min-max] of {args.runs}; load average {os.getloadavg()[0]:.1f}")
    print(f"  {'':<6} {'bytes/push':<30} {'saving':<8} {'samples/s':<26} {'test accuracy':<26} {'vs none':<8}")
    for kind in kinds:
        per_push = [r["bytes_per_push"] for r in runs[kind]]
        rate = [r["samples_per_second"] for r in runs[kind]]
        accuracy = [r["accuracy"] for r in runs[kind]]
        saving = f"{raw / statistics.median(per_push):.1f}x" if raw else "-"
        delta = f"{statistics.median(accuracy) - base_acc:+.4f}" if base_acc is not None else "-"
        print(f"  {kind:<6} {_cell(per_push, ',.0f'):<30} {saving:<8} {_cell(rate, ',.0f'):<26} "
              f"{_cell(accuracy, '.4f'):<26} {delta:<8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": args.dataset, "topk_ratio": args.topk_ratio,
                                               "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
