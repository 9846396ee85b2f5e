"""Sparse push bytes: what one step of a 1,000,000-row embedding table puts on the wire.

The must-show of issue 3: *bytes pushed per step for the 1M-row table are within 2x of (rows
touched x row bytes), measured and printed by a benchmark*. This script measures it, prints it and
exits 1 when any step's ratio is above ``--max-ratio`` (2), so it doubles as a check.

What runs:
    *servers*: 1 and 2 real ParameterServers in this process (``lepton.rpc.Server`` on
    127.0.0.1:0 with its interceptors, ``ParameterServerServicer`` and ``ParameterServer``,
    async mode, served by tests/support.py's ``serve_layout``), holding the table as
    ``coordinator.layout.balance`` cuts it (2 servers: rows [0, 500000) and [500000, 1000000), each
    a slice marked ``sparse``). The servers' optimizer is
    built as a job's would be: ``--optimizer adam`` gives SparseAdam on the table.

    *the table*: 1,000,000 x 16 float32 (64 B a row, 64,000,000 B in all; ``--table-rows``,
    ``--dim``). A worker-side replica of it feeds an ``nn.EmbeddingBag(sparse=True, mode="sum")``
    over bags of 100 ids, and the loss is the mean squared error of the bags against 1, so the
    gradients are real uncoalesced COO tensors as autograd makes them.

    *a step*, through the worker's own data path (``worker.dataplane.ServerSet``, as
    ``worker/agent.py`` trains): ``pull_rows`` pulls the rows the step reads from each server
    (``ParameterClient.pull(rows=...)``) and writes them into the replica, forward/backward, then
    ``push_pull`` sends one ``ParameterClient.push_pull`` per server (fanned out on threads) with
    ``sparse_part`` of the gradient and writes the rows that come back into the replica. The
    timed pull and push_pull include those writes (the dense baseline's too).

    *rows touched*: each step reads exactly R distinct rows (``--rows-per-step``, default 100,
    1,000 and 10,000). Ids are drawn Zipf-like (``P(rank k) ∝ 1/k`` over the whole table, ranks
    mapped to ids by a fixed random permutation so hot rows are spread over both servers;
    ``--draw uniform`` draws uniformly) until R distinct ids are seen; the draws, duplicates
    included, are the step's tokens.

What is measured, per step:
    *wire bytes pushed*: the serialized size of every ``PushRequest`` message the servers received
    (``ByteSize()``, which for these messages is the length of the bytes parsed) plus gRPC's 5-byte
    length prefix per message, summed over servers. HTTP/2 frame headers (9 B per frame of at most
    16 KiB) and the call's HTTP/2 headers are not counted. Measured by a servicer subclass that
    wraps the request stream; everything else is the unmodified server.

    *server counter*: the delta of ``bytes_pushed`` from ``GetServerStatus`` (the node counts a
    row-sparse gradient as its rows plus 8 B per row index).

    Both are divided by ``rows touched x row bytes``; the dense alternative is the whole table
    (``table rows x row bytes``), what the push would weigh if the table were dense.

    *time*: the pull-rows fan-out and the push_pull fan-out, each timed on its own; medians over
    every measured step of every repeat (and the spread of the per-repeat medians). Baseline in the
    same run: the same number of bytes as a *dense* tensor (R x dim float32, laid out across the
    same number of servers by ``balance``, the same optimizer as a dense one), pulled whole and
    push_pulled whole, steps interleaved sparse, dense, sparse, dense... so that drift in machine
    load hits both. And
    once per run, ``--dense-steps`` push_pulls of the whole table as a dense gradient on one server
    (the price without the sparse path).

Caveats printed with the results: client and servers share one process (and so the GIL) and talk
over loopback; warm-up steps (``--warmup``) are not reported (the first SparseAdam step
allocates its state for the whole table); default glibc allocator unless ``GLIBC_TUNABLES`` is set;
one torch thread (``--torch-threads``): with torch's default of one per core, the client's and
the servers' handler threads oversubscribed the 2 cores of this (loaded) machine: one server's
``node.push_pull`` of 10,000 rows took 194 ms instead of 15 ms.

Measured 2026-11-27 with the defaults (1M x 16 table, Zipf, adam lr 0.01, 3 warm-up + 3 x 20
steps per configuration, 1 torch thread, default allocator; a 2-core VM that another engineer's
test run was loading, so times are +-30 %; 26 s wall, 1.2 GB peak RSS)::

    servers  rows touched  rows x 64 B  wire pushed  ratio (worst)  server counter  wire pulled
          1           100        6,400        6,816   1.065 (1.065)   7,200 (1.125)       13,226
          1         1,000       64,000       67,108   1.049 (1.049)  72,000 (1.125)      131,119
          1        10,000      640,000      669,975   1.047 (1.047) 720,000 (1.125)    1,309,984
          2           100        6,400        6,985   1.091 (1.092)   7,200 (1.125)       13,430
          2         1,000       64,000       67,268   1.051 (1.051)  72,000 (1.125)      131,317
          2        10,000      640,000      669,991   1.047 (1.047) 720,000 (1.125)    1,310,040

    dense alternative: the whole table, 64,000,000 B a push (64,002,780 B on the wire)

    ms per step      pull rows  push_pull  | same bytes dense: pull  push_pull | push_pull ratio
    1 server,    100      2.21       4.32  |                   1.69       4.38 |  0.99
    1 server,  1,000      2.28       5.63  |                   1.72       4.76 |  1.18
    1 server, 10,000      6.31      22.52  |                   3.22       7.84 |  2.87
    2 servers,   100      4.16       8.51  |                   3.41       6.57 |  1.30
    2 servers, 1,000      5.00      11.37  |                   3.60       7.13 |  1.59
    2 servers,10,000     10.66      39.70  |                   5.54      11.96 |  3.32
    whole table dense, 1 server: pull 212 ms, push_pull 636 ms

    (a second run, less loaded: 10,000 rows push_pull 28.1 ms against 7.25 ms dense with 1
    server, 26.0 against 9.46 with 2; the whole table 554 ms; bytes identical)

Reading it: the bytes pushed are the rows' values plus ~3 B a row for its index (a packed varint
below 2^21) plus ~115 B of header and chunk framing per server and push; the server's counter
charges 8 B per index (72 B a row, 1.125). The fixed part means the ratio passes 2 only for
tiny pushes: 1 row touched measured 2.81 (1 server) and 5.33 (2 servers, where the server whose
rows were not touched still gets its empty push, as a worker sends it), 3 rows 1.65 and 2.51,
10 rows 1.23 and 1.49. ``wire pulled`` is about twice the rows' bytes because the rows come back
twice per step: once by the Pull before the batch, once in the PushPull answer. A step of 10,000
rows is ~28x faster than pushing the table dense, but ~3x slower than pushing the same bytes as
a dense tensor: with ``--optimizer sgd`` it is still 19.9 ms against 7.6 ms (1 server), so it is
not SparseAdam alone. A per-function timing of the 1-server, 10,000-row sgd push_pull
(14.6 ms that run) found: the worker's ``sparse_part`` (coalescing the 20,650-entry autograd
gradient) 2.9 ms, the server's ``_selections`` (``torch.tensor(list(rows))`` of the RowSelection)
1.15 ms per selection, ``store.apply`` (coalesce again and the sparse add into the 1M-row
table) 2.35 ms, ``check_gradients`` 0.65 ms, the row snapshot 0.6 ms; with adam, SparseAdam's
``sparse_mask`` and three sparse ``add_`` into the full-size state cost ~11 ms at 10,000 random
rows.

How to run::

    python bench/sparse.py                                   # the must-show, about 1 minute
    python bench/sparse.py --rows-per-step 10,100,100000 --servers 1,2,4 --json sparse.json
    python bench/sparse.py --draw uniform --optimizer sgd --dense-steps 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "tests"):  # run as a script from anywhere; tests/support.py serves the servers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from lepton.clients import MemberId, ParameterClient, new_request_id  # noqa: E402
from ps_server.parameter_server import ParameterServer  # noqa: E402
from ps_server.servicer import ParameterServerServicer  # noqa: E402
from support import ServedShard, layout_info, serve_layout, stop_shards  # noqa: E402
from worker.dataplane import ServerSet  # noqa: E402

TABLE = "embedding.weight"
BASELINE = "dense.weight"
BAG_TOKENS = 100  # ids per bag (a synthetic-text document has 100)
GRPC_PREFIX_BYTES = 5  # gRPC's per-message compressed flag + length
CALL_TIMEOUT_S = 120.0
WORKER = MemberId("w-0", 1)  # the identity serve_layout puts on each server's roster


# --- the servers ---------------------------------------------------------------------------------


class WireMeter:
    """Bytes of the messages that crossed one server's ParameterServer service, by direction."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.push_bytes = 0
        self.push_messages = 0
        self.pull_bytes = 0  # Pull requests and every PullResponse (Pull and PushPull answers)

    def requests(self, messages: Iterator) -> Iterator:
        for msg in messages:
            with self._lock:
                self.push_bytes += msg.ByteSize() + GRPC_PREFIX_BYTES
                self.push_messages += 1
            yield msg

    def responses(self, messages: Iterator) -> Iterator:
        for msg in messages:  # the servicer answers wire bytes (lepton.data_wire)
            with self._lock:
                self.pull_bytes += len(msg) + GRPC_PREFIX_BYTES
            yield msg

    def read(self) -> tuple[int, int]:
        with self._lock:
            return self.push_bytes, self.pull_bytes


class MeteredServicer(ParameterServerServicer):
    """The unmodified servicer, with the PushPull request stream and every answer counted."""

    def __init__(self, node: ParameterServer, meter: WireMeter) -> None:
        super().__init__(node)
        self._meter = meter

    def PushPull(self, request_iterator, context):
        yield from self._meter.responses(super().PushPull(self._meter.requests(request_iterator), context))

    def PushPullUnary(self, request, context):
        (answer,) = self._meter.responses([super().PushPullUnary(next(self._meter.requests([request])), context)])
        return answer

    def Pull(self, request, context):
        with self._meter._lock:
            self._meter.pull_bytes += request.ByteSize() + GRPC_PREFIX_BYTES
        yield from self._meter.responses(super().Pull(request, context))


class Cluster:
    """``count`` async parameter servers holding ``tensor`` as ``balance`` cuts it (those left
    without rows are not started), each with its wire meter, and the worker's data path to them
    (``worker.dataplane.ServerSet``), which writes what comes back into ``replica``."""

    def __init__(
        self, name: str, tensor: torch.Tensor, count: int, sparse: bool, optimizer: str, lr: float,
        replica: torch.Tensor,
    ) -> None:
        self.meters: list[WireMeter] = []

        def metered(node: ParameterServer) -> MeteredServicer:
            self.meters.append(WireMeter())
            return MeteredServicer(node, self.meters[-1])

        self.shards: list[ServedShard] = serve_layout(
            {name: tensor}, count, optimizer, lr, {}, 1, step_timeout_s=CALL_TIMEOUT_S, mode="async",
            sparse=[name] if sparse else [], skip_empty=True, servicer=metered,
        )
        layout = layout_info(self.shards)
        self.servers = ServerSet(
            {name: replica}, lambda: layout, lambda: WORKER,
            connect=lambda address: ParameterClient(address, timeout_s=CALL_TIMEOUT_S),
        )

    def counters(self) -> tuple[int, int]:
        """(wire bytes pushed, server bytes_pushed) summed over servers."""
        wire = sum(m.read()[0] for m in self.meters)
        counted = sum(self.servers.fan_out(lambda server, client: client.server_status().bytes_pushed))
        return wire, counted

    def pulled_wire(self) -> int:
        return sum(m.read()[1] for m in self.meters)

    def close(self) -> None:
        self.servers.close()
        stop_shards(self.shards)


# --- the workload --------------------------------------------------------------------------------


class RowDraws:
    """Steps of token ids over ``rows`` ids, each with exactly R distinct ids."""

    def __init__(self, rows: int, draw: str, seed: int) -> None:
        self.rows = rows
        self.draw = draw
        self.generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randperm(rows, generator=self.generator)  # rank -> id
        if draw == "zipf":
            self.cdf = torch.cumsum(1.0 / torch.arange(1, rows + 1, dtype=torch.float64), 0)
        elif draw != "uniform":
            raise ValueError(f"--draw is zipf or uniform, not {draw!r}")

    def _sample(self, n: int) -> torch.Tensor:
        if self.draw == "uniform":
            return torch.randint(0, self.rows, (n,), generator=self.generator)
        u = torch.rand(n, generator=self.generator, dtype=torch.float64) * self.cdf[-1]
        return self.ids[torch.searchsorted(self.cdf, u).clamp_(max=self.rows - 1)]

    def step(self, distinct: int) -> torch.Tensor:
        """The shortest run of draws that holds ``distinct`` distinct ids."""
        if not 0 < distinct <= self.rows:
            raise ValueError(f"cannot touch {distinct} of {self.rows} rows")
        tokens = self._sample(2 * distinct)
        while torch.unique(tokens).numel() < distinct:
            tokens = torch.cat([tokens, self._sample(2 * distinct)])
        unique, inverse = torch.unique(tokens, return_inverse=True)
        first = torch.full((unique.numel(),), tokens.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(tokens.numel()), "amin")
        end = int(first.sort().values[distinct - 1]) + 1
        return tokens[:end]


class Replica:
    """The worker's copy of the table and the model that reads it."""

    def __init__(self, table: torch.Tensor) -> None:
        self.bag = nn.EmbeddingBag(table.shape[0], table.shape[1], mode="sum", sparse=True)
        with torch.no_grad():
            self.bag.weight.copy_(table)

    def gradient(self, tokens: torch.Tensor) -> torch.Tensor:
        """The table's COO gradient of a mean squared error over bags of BAG_TOKENS ids."""
        offsets = torch.arange(0, tokens.numel(), BAG_TOKENS)
        out = self.bag(tokens, offsets)
        target = torch.ones_like(out)
        self.bag.zero_grad(set_to_none=True)
        nn.functional.mse_loss(out, target).backward()
        grad = self.bag.weight.grad
        assert grad is not None and grad.is_sparse
        return grad.detach()

# --- the two kinds of step -----------------------------------------------------------------------


@dataclass
class StepFigures:
    rows: int
    tokens: int
    wire_pushed: int
    server_pushed: int
    wire_pulled: int
    pull_s: float
    push_pull_s: float


def sparse_step(cluster: Cluster, replica: Replica, tokens: torch.Tensor) -> StepFigures:
    """Pull the rows ``tokens`` read, compute, push the row gradients (one RPC per server)."""
    touched = torch.unique(tokens)
    wire0, counted0 = cluster.counters()
    pulled0 = cluster.pulled_wire()
    start = time.perf_counter()
    cluster.servers.pull_rows({TABLE: touched})
    pull_s = time.perf_counter() - start
    grad = replica.gradient(tokens)
    start = time.perf_counter()
    replies = cluster.servers.push_pull(len(tokens), {TABLE: grad}, new_request_id(), timeout_s=CALL_TIMEOUT_S)
    push_pull_s = time.perf_counter() - start
    for server_id, reply in replies.items():
        assert reply.applied, f"{server_id}: push not applied ({reply})"
    wire1, counted1 = cluster.counters()
    return StepFigures(
        rows=touched.numel(), tokens=tokens.numel(), wire_pushed=wire1 - wire0, server_pushed=counted1 - counted0,
        wire_pulled=cluster.pulled_wire() - pulled0, pull_s=pull_s, push_pull_s=push_pull_s,
    )


def dense_step(cluster: Cluster, grad: torch.Tensor, tokens: int) -> StepFigures:
    """The baseline: the same bytes as one dense tensor, pulled whole and push_pulled whole."""
    wire0, counted0 = cluster.counters()
    pulled0 = cluster.pulled_wire()
    start = time.perf_counter()
    cluster.servers.pull_all()
    pull_s = time.perf_counter() - start
    start = time.perf_counter()
    (name,) = cluster.servers.tensors
    replies = cluster.servers.push_pull(tokens, {name: grad}, new_request_id(), timeout_s=CALL_TIMEOUT_S)
    push_pull_s = time.perf_counter() - start
    for server_id, reply in replies.items():
        assert reply.applied, f"{server_id}: push not applied ({reply})"
    wire1, counted1 = cluster.counters()
    return StepFigures(
        rows=grad.shape[0], tokens=tokens, wire_pushed=wire1 - wire0, server_pushed=counted1 - counted0,
        wire_pulled=cluster.pulled_wire() - pulled0, pull_s=pull_s, push_pull_s=push_pull_s,
    )


# --- measuring and reporting ---------------------------------------------------------------------


@dataclass
class Configuration:
    servers: int
    rows: int
    sparse: list[list[StepFigures]] = field(default_factory=list)  # per repeat, per step
    dense: list[list[StepFigures]] = field(default_factory=list)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(config: Configuration, row_bytes: int, table_bytes: int) -> dict:
    steps = [s for repeat in config.sparse for s in repeat]
    dense = [s for repeat in config.dense for s in repeat]
    ideal = config.rows * row_bytes
    wire_ratios = [s.wire_pushed / ideal for s in steps]
    server_ratios = [s.server_pushed / ideal for s in steps]
    per_repeat = [_median([s.push_pull_s for s in r]) for r in config.sparse]
    dense_repeat = [_median([s.push_pull_s for s in r]) for r in config.dense]
    return {
        "servers": config.servers,
        "rows_touched": config.rows,
        "tokens_median": _median([s.tokens for s in steps]),
        "steps_measured": len(steps),
        "rows_x_row_bytes": ideal,
        "wire_pushed_median": _median([s.wire_pushed for s in steps]),
        "wire_pushed_max": max(s.wire_pushed for s in steps),
        "wire_ratio_median": _median(wire_ratios),
        "wire_ratio_max": max(wire_ratios),
        "server_pushed_median": _median([s.server_pushed for s in steps]),
        "server_ratio_max": max(server_ratios),
        "wire_pulled_median": _median([s.wire_pulled for s in steps]),
        "dense_table_bytes": table_bytes,
        "wire_over_dense_table": _median([s.wire_pushed for s in steps]) / table_bytes,
        "sparse_pull_ms": 1e3 * _median([s.pull_s for s in steps]),
        "sparse_push_pull_ms": 1e3 * _median([s.push_pull_s for s in steps]),
        "sparse_push_pull_ms_repeat_medians": [1e3 * v for v in per_repeat],
        "baseline_wire_pushed_median": _median([s.wire_pushed for s in dense]),
        "baseline_pull_ms": 1e3 * _median([s.pull_s for s in dense]),
        "baseline_push_pull_ms": 1e3 * _median([s.push_pull_s for s in dense]),
        "baseline_push_pull_ms_repeat_medians": [1e3 * v for v in dense_repeat],
    }


def whole_table_dense(table: torch.Tensor, steps: int, optimizer: str, lr: float) -> dict:
    """``steps`` push_pulls of the whole table as a dense gradient to one server (after one
    warm-up): what a step costs without the sparse path."""
    cluster = Cluster(TABLE, table, 1, sparse=False, optimizer=optimizer, lr=lr, replica=torch.empty_like(table))
    try:
        grad = torch.full_like(table, 1e-3)
        figures = [dense_step(cluster, grad, 1) for _ in range(steps + 1)][1:]
    finally:
        cluster.close()
    return {
        "steps": steps,
        "wire_pushed_median": _median([s.wire_pushed for s in figures]),
        "pull_ms": 1e3 * _median([s.pull_s for s in figures]),
        "push_pull_ms": 1e3 * _median([s.push_pull_s for s in figures]),
    }


def measure(args: argparse.Namespace) -> tuple[list[dict], dict | None, dict]:
    generator = torch.Generator().manual_seed(args.seed)
    table = torch.randn(args.table_rows, args.dim, generator=generator) * 0.1
    row_bytes = args.dim * table.element_size()
    table_bytes = table.numel() * table.element_size()
    draws = RowDraws(args.table_rows, args.draw, args.seed + 1)
    summaries = []
    for count in args.servers:
        replica = Replica(table)
        cluster = Cluster(
            TABLE, table, count, sparse=True, optimizer=args.optimizer, lr=args.lr, replica=replica.bag.weight
        )
        baselines = {
            rows: Cluster(
                BASELINE, torch.randn(rows, args.dim, generator=generator), count, sparse=False,
                optimizer=args.optimizer, lr=args.lr, replica=torch.empty(rows, args.dim),
            )
            for rows in args.rows_per_step
        }
        try:
            configs = {rows: Configuration(count, rows) for rows in args.rows_per_step}
            for rows in args.rows_per_step:  # warm-up, not reported
                for _ in range(args.warmup):
                    tokens = draws.step(rows)
                    sparse_step(cluster, replica, tokens)
                    dense_step(baselines[rows], torch.randn(rows, args.dim, generator=generator), len(tokens))
            for _ in range(args.repeats):
                for rows in args.rows_per_step:
                    steps = [draws.step(rows) for _ in range(args.steps)]  # drawn outside the timers
                    grads = [torch.randn(rows, args.dim, generator=generator) for _ in range(args.steps)]
                    sparse, dense = [], []
                    for tokens, grad in zip(steps, grads, strict=True):
                        sparse.append(sparse_step(cluster, replica, tokens))
                        dense.append(dense_step(baselines[rows], grad, len(tokens)))
                    configs[rows].sparse.append(sparse)
                    configs[rows].dense.append(dense)
            for status in cluster.servers.fan_out(lambda server, client: client.server_status()):
                assert status.pushes_rejected == 0 and status.pushes_stale == 0, status
        finally:
            cluster.close()
            for b in baselines.values():
                b.close()
        del replica
        summaries += [summarize(configs[rows], row_bytes, table_bytes) for rows in args.rows_per_step]
    whole = whole_table_dense(table, args.dense_steps, args.optimizer, args.lr) if args.dense_steps else None
    env = {
        "table_rows": args.table_rows,
        "dim": args.dim,
        "dtype": "float32",
        "row_bytes": row_bytes,
        "table_bytes": table_bytes,
        "draw": args.draw,
        "bag_tokens": BAG_TOKENS,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "mode": "async",
        "warmup_steps": args.warmup,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES") or "default",
        "transport": "loopback 127.0.0.1",
        "processes": "client and servers in one process (shared GIL)",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "torch": torch.__version__,
    }
    return summaries, whole, env


def print_report(summaries: list[dict], whole: dict | None, env: dict, max_ratio: float) -> None:
    print(
        f"table {env['table_rows']:,} x {env['dim']} float32 = {env['table_bytes']:,} B "
        f"({env['row_bytes']} B a row); ids drawn {env['draw']}, bags of {env['bag_tokens']}; "
        f"{env['optimizer']} lr {env['lr']}, {env['mode']}"
    )
    print(
        f"{env['processes']}; {env['transport']}; {env['cpus']} CPUs, {env['torch_threads']} torch thread(s); "
        f"GLIBC_TUNABLES={env['glibc_tunables']}; python {env['python']}, grpcio {env['grpcio']}, torch {env['torch']}"
    )
    print(
        f"{env['warmup_steps']} warm-up steps per configuration (not reported), then "
        f"{env['repeats']} x {env['steps_per_repeat']} measured steps, sparse and baseline interleaved"
    )
    print()
    print("bytes per step (medians; ratio columns: median / worst step)")
    header = (
        f"{'servers':>7} {'rows':>7} {'tokens':>7} {'rows x row B':>13} {'wire pushed':>12} "
        f"{'ratio':>11} {'server ctr':>11} {'ratio max':>9} {'dense table':>12} {'wire/dense':>11} "
        f"{'wire pulled':>12}"
    )
    print(header)
    print("-" * len(header))
    for s in summaries:
        print(
            f"{s['servers']:>7} {s['rows_touched']:>7,} {s['tokens_median']:>7,.0f} {s['rows_x_row_bytes']:>13,} "
            f"{s['wire_pushed_median']:>12,.0f} {s['wire_ratio_median']:>5.3f}/{s['wire_ratio_max']:<5.3f} "
            f"{s['server_pushed_median']:>11,.0f} {s['server_ratio_max']:>9.3f} {s['dense_table_bytes']:>12,} "
            f"{s['wire_over_dense_table']:>11.2e} {s['wire_pulled_median']:>12,.0f}"
        )
    print()
    print("time per step, ms (medians over all measured steps; [per-repeat medians of push_pull])")
    header = (
        f"{'servers':>7} {'rows':>7} {'pull rows':>10} {'push_pull':>10} {'baseline pull':>14} "
        f"{'baseline push_pull':>19} {'sparse/baseline':>16}  repeats sparse | baseline"
    )
    print(header)
    print("-" * len(header))
    for s in summaries:
        ratio = s["sparse_push_pull_ms"] / s["baseline_push_pull_ms"]
        reps = ", ".join(f"{v:.1f}" for v in s["sparse_push_pull_ms_repeat_medians"])
        base = ", ".join(f"{v:.1f}" for v in s["baseline_push_pull_ms_repeat_medians"])
        print(
            f"{s['servers']:>7} {s['rows_touched']:>7,} {s['sparse_pull_ms']:>10.2f} {s['sparse_push_pull_ms']:>10.2f} "
            f"{s['baseline_pull_ms']:>14.2f} {s['baseline_push_pull_ms']:>19.2f} {ratio:>16.2f}  [{reps} | {base}]"
        )
    print("baseline: the same bytes as one dense R x dim float32 tensor on the same number of servers, dense "
          f"{env['optimizer']}")
    if whole is not None:
        print(
            f"whole table as a dense gradient, 1 server, {whole['steps']} steps: wire pushed "
            f"{whole['wire_pushed_median']:,.0f} B, pull {whole['pull_ms']:.0f} ms, "
            f"push_pull {whole['push_pull_ms']:.0f} ms"
        )
    worst = max(max(s["wire_ratio_max"], s["server_ratio_max"]) for s in summaries)
    verdict = "within" if worst <= max_ratio else "NOT within"
    print()
    print(f"worst step: bytes pushed / (rows touched x row bytes) = {worst:.3f} ({verdict} {max_ratio}x)")


def _int_list(text: str) -> list[int]:
    return [int(v.replace("_", "")) for v in text.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table-rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=16, help="floats per row (16: 64 B rows)")
    p.add_argument("--rows-per-step", type=_int_list, default=[100, 1_000, 10_000], metavar="R,R,...")
    p.add_argument("--servers", type=_int_list, default=[1, 2], metavar="M,M,...")
    p.add_argument("--draw", choices=("zipf", "uniform"), default="zipf")
    p.add_argument("--optimizer", default="adam", help="the servers' optimizer (adam: SparseAdam on the table)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=20, help="measured steps per configuration and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="unreported steps per configuration")
    p.add_argument("--dense-steps", type=int, default=2, help="whole-table dense push_pulls (0: skip)")
    p.add_argument("--max-ratio", type=float, default=2.0, help="exit 1 when any step's ratio is above")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch intra-op threads (1: client and servers share one process and its cores)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.dense_steps < 0 or args.torch_threads < 1:
        p.error("need --steps >= 1, --repeats >= 1, --warmup >= 0, --dense-steps >= 0, --torch-threads >= 1")
    if not args.rows_per_step or not args.servers or min(args.servers) < 1:
        p.error("need at least one --rows-per-step and --servers >= 1")
    if max(args.rows_per_step) > args.table_rows or min(args.rows_per_step) < 1:
        p.error("--rows-per-step must be within [1, --table-rows]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    try:
        summaries, whole, env = measure(args)
    finally:
        torch.set_num_threads(threads)
    print_report(summaries, whole, env, args.max_ratio)
    worst = max(max(s["wire_ratio_max"], s["server_ratio_max"]) for s in summaries)
    if args.json is not None:
        report = {"environment": env, "configurations": summaries, "whole_table_dense": whole,
                  "worst_ratio": worst, "max_ratio": args.max_ratio}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if worst <= args.max_ratio and not math.isnan(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
