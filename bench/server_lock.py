"""How long a parameter server holds its gate lock per push, and what that costs in pushes/s.

One process, no gRPC: a ``ParameterServer`` (``--mode``, async by default; Adam; ``--mib`` MiB of
float32 parameters in 4 tensors; periodic checkpoints every ``--checkpoint-every-steps`` updates
into a temporary directory) and ``--pushers`` threads each calling ``push_pull`` as the servicer does (the pull half
encoded by the servicer's encoder under the lock). The gate's lock is swapped for one that times
every hold. Per run: pushes/s, push_pull latency p50/p99/max, and the lock's hold time per push
(total / pushes) and its longest single hold.

``--ab A B`` runs the same measurement against two source trees (``--repo``), interleaved,
``--reps`` times each, and prints medians and spreads ((max - min) / median) side by side.

    python bench/server_lock.py                                   # this tree, one run
    python bench/server_lock.py --ab /tmp/lepton-main . --reps 5  # before/after
    python bench/server_lock.py --quick                           # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


class TimedLock:
    """A lock that records how long each acquisition was held: wall time, and the CPU time the
    holding thread spent (on a loaded machine a holder is often preempted; the CPU time is the
    work done under the lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since = (0.0, 0.0)
        self.holds: list[float] = []
        self.cpu: list[float] = []

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            self._since = (time.perf_counter(), time.thread_time())
        return got

    def release(self) -> None:
        wall, cpu = self._since
        self.holds.append(time.perf_counter() - wall)
        self.cpu.append(time.thread_time() - cpu)
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()


def measure(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(args.repo).resolve()))
    import torch

    torch.set_num_threads(1)
    from ps_server.checkpoint_files import CheckpointDirectory
    from ps_server.parameter_server import ParameterServer
    from ps_server.servicer import _ONE_MESSAGE

    rows = max(1, int(args.mib * (1 << 20)) // (4 * 1024 * 4))
    tensors = {f"layer{i}.weight": torch.zeros(rows, 1024) for i in range(4)}
    grads = {n: torch.full_like(t, 1e-3) for n, t in tensors.items()}
    with tempfile.TemporaryDirectory(prefix="lepton-bench-") as tmp:
        node = ParameterServer("bench-ps")
        node.load(
            tensors, "adam", 1e-3, {}, args.mode, 60.0,
            checkpoints=CheckpointDirectory(tmp) if args.checkpoint_every_steps else None,
            checkpoint_every_steps=args.checkpoint_every_steps,
        )
        gate = node.gate
        lock = TimedLock()
        gate._cond = threading.Condition(lock)
        members = [(f"w-{i}", 1) for i in range(args.pushers)]
        node._roster.check = lambda member_id, incarnation: True  # every pusher is known
        latencies: list[float] = []
        per_thread = args.pushes // args.pushers

        def pusher(member: tuple[str, int]) -> None:
            mine = []
            for _ in range(per_thread):
                start = time.perf_counter()
                node.push_pull(*member, gate.version, 1, grads, 60.0, "", pack=_ONE_MESSAGE)
                mine.append(time.perf_counter() - start)
            latencies.extend(mine)

        warm = [  # one push each, at once (a sync step waits for every pusher), not measured
            threading.Thread(target=lambda m=m: node.push_pull(*m, 0, 1, grads, 60.0, "", pack=_ONE_MESSAGE))
            for m in members
        ]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        lock.holds.clear()
        lock.cpu.clear()
        latencies.clear()
        threads = [threading.Thread(target=pusher, args=(m,)) for m in members]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        holds, cpu = list(lock.holds), list(lock.cpu)
        close = getattr(node, "close", None)
        if close is not None:
            close()
        pushes = per_thread * args.pushers
        latencies.sort()
        return {
            "pushes_per_s": pushes / wall,
            "latency_p50_ms": 1e3 * latencies[len(latencies) // 2],
            "latency_p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "latency_max_ms": 1e3 * latencies[-1],
            "lock_ms_per_push": 1e3 * sum(holds) / pushes,
            "lock_max_ms": 1e3 * max(holds),
            "lock_cpu_ms_per_push": 1e3 * sum(cpu) / pushes,
            "lock_cpu_max_ms": 1e3 * max(cpu),
        }


FIELDS = (
    "pushes_per_s", "latency_p50_ms", "latency_p99_ms", "latency_max_ms", "lock_ms_per_push", "lock_max_ms",
    "lock_cpu_ms_per_push", "lock_cpu_max_ms",
)


def ab(args: argparse.Namespace, argv: list[str]) -> None:
    own = [a for a in argv if a not in ("--ab", *args.ab)]
    runs: dict[str, list[dict]] = {tree: [] for tree in args.ab}
    for rep in range(args.reps):
        for tree in args.ab if rep % 2 == 0 else reversed(args.ab):
            out = subprocess.run(
                [sys.executable, __file__, *own, "--repo", tree, "--json-line"],
                check=True, capture_output=True, text=True, timeout=600,
            ).stdout.strip().splitlines()[-1]
            runs[tree].append(json.loads(out))
            print(f"rep {rep} {tree}: {runs[tree][-1]}", file=sys.stderr, flush=True)
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
          f"{args.mode}, {args.mib} MiB, Adam, checkpoint every {args.checkpoint_every_steps}, {args.pushers} pushers, "
          f"{args.pushes} pushes, {args.reps} reps (median, spread)")
    print(f"| {'tree':<24} | " + " | ".join(f"{f:>20}" for f in FIELDS) + " |")
    for tree, results in runs.items():
        cells = []
        for f in FIELDS:
            values = [r[f] for r in results]
            median = statistics.median(values)
            spread = (max(values) - min(values)) / median if median else 0.0
            cells.append(f"{median:9.2f} ±{100 * spread:3.0f}%")
        print(f"| {tree:<24} | " + " | ".join(f"{c:>20}" for c in cells) + " |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(HERE), help="the source tree to import (default: this one)")
    p.add_argument("--mib", type=float, default=16.0)
    p.add_argument("--checkpoint-every-steps", type=int, default=10)
    p.add_argument("--pushers", type=int, default=2)
    p.add_argument("--mode", choices=("async", "sync", "ssp"), default="async")
    p.add_argument("--pushes", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ab", nargs=2, metavar=("TREE_A", "TREE_B"), default=None)
    p.add_argument("--quick", action="store_true", help="1 MiB, 20 pushes")
    p.add_argument("--json-line", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.mib, args.pushes, args.checkpoint_every_steps = 1.0, 20, 5
    if args.ab:
        ab(args, argv)
        return 0
    result = measure(args)
    print(json.dumps(result) if args.json_line else "  ".join(f"{k}={v:.2f}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
