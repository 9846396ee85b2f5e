"""Training throughput, side by side in one interleaved run: one PyTorch process, DDP-gloo with 2
processes, and Lepton with 2 workers and 1 parameter server (async), on the same model, data and batches.

What is measured, per data set (default: synthetic-image, then digits), each at Lepton's settings
for it (``lepton.config.RECOMMENDED``, else JobSpec's: synthetic-image MLP 1000->64->10, batch 128,
Adam lr 1e-3, 3 epochs; digits MLP, batch 32, Adam lr 0.01, 10 epochs; 12 shards, seed 0):

    *single*: one process trains ``bench/reference.py``'s ``train_reference``: the cluster's own
    batches (shard after shard, each in a worker's seeded order), ``loss.backward(); opt.step()``.

    *ddp*: 2 processes (``torch.distributed``, gloo, a FileStore rendezvous), the same model from the
    same seed wrapped in ``DistributedDataParallel``, the same optimizer. Of each epoch's batches
    (the same list as *single*), rank r trains batches r, r+2, r+4, ... (a batch left without a
    partner at an epoch's end is skipped by both), so each rank computes batches of the job's
    batch size, as a Lepton worker does; samples counted are those both ranks trained.

    *lepton*: ``lepton up --workers 2 --ps 1 --mode async`` (real processes over loopback), the
    same data set and seed; its JSON report gives the samples trained and the training seconds.

    *lepton-no-overlap* (with ``--no-overlap-row``): the same with ``--no-overlap`` (each worker
    pushes after backward and loads batches in turn), interleaved with the others: the A/B of
    worker/overlap.py.

Training time is measured the same way for all: from the first step to the last, excluding start-up,
data set and model building, and evaluation. For *single* and *ddp* that is a ``perf_counter``
around the training loop (for ddp: rank 0's, after a barrier before and after); for Lepton it is the
coordinator's ``training_seconds``, from the job entering TRAINING (every server has loaded its
share) to the last shard completed. samples/s = samples trained / those seconds. Accuracy is the
test accuracy of the final parameters (``lepton.workloads.evaluate``; Lepton: the evaluating
worker's report).

Threads: every process, of every kind, runs with one intra-op thread (``OMP_NUM_THREADS=1``,
set by this script for itself and inherited by every process it starts, ``lepton up``'s children
included), as torchrun sets it; with torch's default each process takes every core and
oversubscribes a 2-core machine.

Repetitions are interleaved (single, ddp, lepton, single, ...), each in a fresh process; the table
gives medians and [min-max], and the ratios of each median to DDP's.

How to run::

    python bench/training.py                             # both data sets, 3 repetitions
    python bench/training.py --dataset digits --runs 5 --json training.json
    python bench/training.py --quick                     # digits, 1 epoch, 1 repetition (the smoke test)
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch: one intra-op thread in this and every child process

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

KINDS = ("single", "ddp", "lepton")
NO_OVERLAP = "lepton-no-overlap"
DDP_RANKS = 2


def job(dataset: str, epochs: int | None, seed: int = 0):
    from lepton.config import job_from_mapping

    values: dict = {"dataset": dataset, "seed": seed, "mode": "async", "parameter_servers": 1}
    if epochs is not None:
        values["epochs"] = epochs
    return job_from_mapping(values)


def run_single(spec) -> dict:
    from reference import train_reference

    result = train_reference(spec)
    return {"samples": result.samples_trained, "seconds": result.training_seconds, "accuracy": result.test_accuracy}


def _ddp_rank(rank: int, spec, store_path: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist
    from reference import reference_batches
    from torch.nn.parallel import DistributedDataParallel

    from lepton.optimizers import build_sparse_aware_optimizer
    from lepton.tasks import resolve_loss, resolve_task, shape_target
    from lepton.workloads import build_model, evaluate, load_workload, sparse_parameter_names, take

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, DDP_RANKS)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=DDP_RANKS)
    try:
        workload = load_workload(spec.dataset, spec.seed)
        task = resolve_task(spec.task, spec.loss, workload.label_dtype)
        model = build_model(spec.model, workload, spec.seed, workload.output_dim(task, spec.loss))
        ddp = DistributedDataParallel(model)
        optimizer = build_sparse_aware_optimizer(
            ddp.module.named_parameters(), sparse_parameter_names(model), spec.optimizer, spec.lr, spec.optimizer_kwargs
        )
        loss_fn = resolve_loss(spec.loss)
        epochs = []
        for epoch in range(spec.epochs):
            batches = list(reference_batches(len(workload.train), spec, epoch))
            pairs = len(batches) // DDP_RANKS
            epochs.append(batches[: pairs * DDP_RANKS])
        dist.barrier()
        start = time.perf_counter()
        samples = 0
        ddp.train()
        for batches in epochs:
            for i in range(rank, len(batches), DDP_RANKS):
                x, y = take(workload.train, batches[i])
                optimizer.zero_grad(set_to_none=True)
                output = ddp(x)
                loss_fn(output, shape_target(spec.loss, task, output, y)).backward()
                optimizer.step()
            samples += sum(len(b) for b in batches)
        dist.barrier()
        seconds = time.perf_counter() - start
        if rank == 0:
            result = evaluate(model, workload.test, workload.num_classes, task=task, loss=spec.loss, loss_fn=loss_fn)
            Path(out_path).write_text(json.dumps({"samples": samples, "seconds": seconds, "accuracy": result.accuracy}))
    finally:
        dist.destroy_process_group()


def run_ddp(spec) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="lepton-ddp-") as tmp:
        out = Path(tmp) / "rank0.json"
        mp.spawn(_ddp_rank, args=(spec, str(Path(tmp) / "store"), str(out)), nprocs=DDP_RANKS, join=True)
        return json.loads(out.read_text())


def run_lepton(spec, extra: tuple[str, ...] = ()) -> dict:
    import reference

    explicit = {"epochs"} if spec.epochs != job(spec.dataset, None).epochs else set()
    result = reference.run_lepton(spec, explicit, workers=2, timeout_s=600.0, extra=extra)
    differ = dict(result.settings_differ or {})
    if spec.task == "auto":
        differ.pop("task", None)  # the report names the task "auto" resolved to
    if result.status != "succeeded" and not (result.status == "settings differ" and not differ):
        raise RuntimeError(f"lepton up: {result.status} (logs in {result.log_dir})")
    if result.log_dir:  # kept by reference.run_lepton for the "settings differ" that was only the task
        shutil.rmtree(result.log_dir, ignore_errors=True)
    return {"samples": result.samples_trained, "seconds": result.training_seconds, "accuracy": result.test_accuracy}


def one(kind: str, dataset: str, epochs: int | None) -> dict:
    """One repetition of one kind, in a fresh process (this script with ``--one``)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", kind, "--dataset", dataset]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} on {dataset} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="synthetic-image,digits", help="comma-separated data sets")
    p.add_argument("--runs", type=int, default=3, help="repetitions of each kind")
    p.add_argument("--epochs", type=int, default=None, help="override the data set's epochs")
    p.add_argument("--quick", action="store_true", help="digits, 1 epoch, 1 repetition")
    p.add_argument("--json", default=None, help="write every repetition here")
    p.add_argument(
        "--no-overlap-row", action="store_true", help="also Lepton with --no-overlap (the overlap A/B)"
    )
    p.add_argument("--one", choices=(*KINDS, NO_OVERLAP), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        import torch

        torch.set_num_threads(1)
        spec = job(args.dataset, args.epochs)
        run = {
            "single": run_single, "ddp": run_ddp, "lepton": run_lepton,
            NO_OVERLAP: lambda spec: run_lepton(spec, ("--no-overlap",)),
        }[args.one]
        print(json.dumps(run(spec)))
        return 0
    if args.quick:
        args.dataset, args.epochs, args.runs = "digits", 1, 1
    everything = {}
    for dataset in [d.strip() for d in args.dataset.split(",") if d.strip()]:
        spec = job(dataset, args.epochs)
        kinds = (*KINDS, NO_OVERLAP) if args.no_overlap_row else KINDS
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for i in range(args.runs):
            for kind in kinds:
                result = one(kind, dataset, args.epochs)
                result["samples_per_second"] = result["samples"] / max(result["seconds"], 1e-9)
                runs[kind].append(result)
                print(f"{dataset} run {i + 1} {kind}: {result['samples_per_second']:.0f} samples/s, "
                      f"accuracy {result['accuracy']:.4f}", flush=True)
        names = ("model", "epochs", "batch_size", "optimizer", "lr", "shards_per_epoch")
        settings = {k: getattr(spec, k) for k in names}
        print(f"\n{dataset} {settings}; one intra-op thread per process; median [min-max] of {args.runs}; "
              f"load average {os.getloadavg()[0]:.1f}")
        ddp_median = statistics.median(r["samples_per_second"] for r in runs["ddp"])
        print(f"  {'':<17} {'samples/s':<26} {'vs ddp':<8} {'test accuracy':<26}")
        for kind in kinds:
            rate = [r["samples_per_second"] for r in runs[kind]]
            accuracy = [r["accuracy"] for r in runs[kind]]
            ratio = statistics.median(rate) / ddp_median
            print(f"  {kind:<17} {_cell(rate, ',.0f'):<26} {ratio:<8.2f} {_cell(accuracy, '.4f'):<26}")
        everything[dataset] = {"settings": settings, "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2, default=lambda o: dataclasses.asdict(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
