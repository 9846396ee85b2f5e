"""Lepton's data plane side by side with what a user would otherwise pick, in one interleaved run.

Paths (every server in its own process, loopback 127.0.0.1, the same intra-op threads everywhere):

    lepton     ``ParameterClient.push_pull`` against a real parameter server (``lepton.rpc.Server``,
               the servicer, a ``ParameterServer`` in async mode with SGD): the worker pushes a
               gradient for every parameter, the server checks and applies it and sends the
               parameters back (``--checkpoint-every-steps N``: and writes a periodic
               checkpoint every N updates into a temporary directory).
    lepton shm the same with ``shared_memory=True`` against servers of its own: gradients and
               parameters through /dev/shm segments (``lepton.shm_client``), one small unary call
               per step; the answer is copied out of the segment as the worker installs it.
    torch RPC  ``torch.distributed.rpc`` over TensorPipe restricted to TCP (transport ``uv``,
               channel ``basic``): ``rpc_sync`` sends the gradients, the server applies the same
               SGD step and returns copies of the parameters.
    gloo       ``torch.distributed.all_reduce`` of the same bytes between 2 processes (gloo).
    raw TCP    the bytes sent to an echo server over one socket and read back into a buffer.

Tables:
    push+pull at ``--sizes`` MiB (4 float32 tensors): MB/s = parameter bytes (10^6) / round trip.
    tiny step: the digits MLP (64-64-10, 4,810 float32 = 19 KB) split over 2 servers, one step =
    push to both and get both answers (lepton: a thread-pool fan-out, as the worker does; lepton,
    no pool: ``push_pull_async`` to both from one thread, then wait; torch RPC: ``rpc_async`` to
    both, then wait); gloo: one all_reduce of 19 KB; raw TCP: one 19 KB echo.

Each repetition runs every path in turn (the order rotates) for a few round trips and keeps their
median; the table shows the median over repetitions and the spread (max - min) / median. Warm-up
round trips come first. Lepton's and torch RPC's answers are checked once at the end (exact SGD
values), so a broken path cannot pass as a fast one.

The glibc allocator settings are read at process start: unless ``GLIBC_TUNABLES`` is set already
(or ``--no-tunables``), the script runs itself again with ``lepton.threads.GLIBC_TUNABLES``, so
every path (children included) runs under the same allocator.

    python bench/dataplane.py                  # 64 and 4 MiB, 6 repetitions
    python bench/dataplane.py --quick          # seconds: the smoke test's run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lepton.threads import GLIBC_TUNABLES  # noqa: E402

MiB = 1 << 20
TENSORS = 4
ROW = 1024
LR = 2.0**-10  # a power of two and a gradient of 1.0: p - lr * g is exact on both sides
TIMEOUT_S = 120.0
WORKER = ("bench-worker", 1)


# --- the payloads ------------------------------------------------------------------------------


def parameters(mib: float, seed: int = 0) -> dict[str, torch.Tensor]:
    rows = max(1, int(mib * MiB) // (TENSORS * ROW * 4))
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(rows, ROW, generator=g) for i in range(TENSORS)}


def digits_halves(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The digits MLP's parameters split into two ~equal-byte shares, as the layout would."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    p = {n: t.detach().clone() for n, t in model.named_parameters()}
    w = p.pop("0.weight")
    return [{"0.weight.a": w[:38].clone()}, {"0.weight.b": w[38:].clone(), **p}]


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- servers, each in its own process ------------------------------------------------------------


def _threads(n: int) -> None:
    torch.set_num_threads(n)


def lepton_server(conn, tensors: dict[str, torch.Tensor], threads: int, checkpoint_every_steps: int = 0) -> None:
    _threads(threads)
    import tempfile

    from lepton.rpc import Server
    from ps_server.checkpoint_files import CheckpointDirectory
    from ps_server.parameter_server import ParameterServer
    from ps_server.roster import WorkerEntry
    from ps_server.servicer import ParameterServerServicer, registration

    node = ParameterServer(member_id="bench-ps")
    directory = tempfile.TemporaryDirectory(prefix="lepton-bench-ckpt-") if checkpoint_every_steps else None
    node.load(
        tensors, "sgd", LR, {}, "async", step_timeout_s=TIMEOUT_S,
        checkpoints=CheckpointDirectory(directory.name) if directory else None,
        checkpoint_every_steps=checkpoint_every_steps,
    )
    node.update_roster([WorkerEntry(WORKER[0], WORKER[1], True)])
    server = Server("127.0.0.1:0", [registration(ParameterServerServicer(node))], reflection_enabled=False)
    server.start()
    conn.send(server.address)
    conn.recv()
    server.stop(0)
    if directory is not None:
        getattr(node, "close", lambda: None)()  # (older trees have no checkpoint writer)
        directory.cleanup()


_RPC_PARAMS: dict[str, torch.Tensor] = {}


def _rpc_sgd(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, g in grads.items():
        p = _RPC_PARAMS[name]
        p.sub_(g, alpha=LR)
        out[name] = p.clone()
    return out


def _rpc_options(port: int):
    from torch.distributed import rpc

    return rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=4, rpc_timeout=TIMEOUT_S, init_method=f"tcp://127.0.0.1:{port}",
        _transports=["uv"], _channels=["basic"],
    )


def rpc_server(conn, rank: int, world: int, port: int, tensors: dict[str, torch.Tensor], threads: int) -> None:
    _threads(threads)
    from torch.distributed import rpc

    _RPC_PARAMS.update({n: t.clone() for n, t in tensors.items()})
    rpc.init_rpc(f"ps{rank}", rank=rank, world_size=world, rpc_backend_options=_rpc_options(port))
    conn.send("ready")
    rpc.shutdown()  # waits for every rank


def gloo_peer(conn, rank: int, port: int, threads: int) -> None:
    _threads(threads)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    conn.send("ready")
    while True:
        command = conn.recv()
        if not isinstance(command, tuple):
            break
        size, iters = command
        t = torch.ones(size // 4)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
        conn.send(times)
    dist.destroy_process_group()


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("echo peer closed")
        got += n


def tcp_echo(conn) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(0)
    head = bytearray(8)
    while True:
        try:
            _recv_exactly(sock, memoryview(head))
        except ConnectionError:
            return
        (n,) = struct.unpack("<Q", head)
        if len(buf) < n:
            buf = bytearray(n)
        _recv_exactly(sock, memoryview(buf)[:n])
        sock.sendall(memoryview(buf)[:n])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the clients --------------------------------------------------------------------------------


def replica(initial: torch.Tensor, steps: int) -> torch.Tensor:
    """The parameters after ``steps`` SGD steps with gradient 1 (each step rounded, as served)."""
    p = initial.clone()
    ones = torch.ones_like(p)
    for _ in range(steps):
        p.sub_(ones, alpha=LR)
    return p


class LeptonPath:
    def __init__(
        self, addresses: list[str], shares: list[dict[str, torch.Tensor]], shared_memory: bool = False
    ) -> None:
        from lepton.clients import MemberId, ParameterClient

        self.member = MemberId(*WORKER)
        kw = {"shared_memory": True} if shared_memory else {}
        self.clients = [ParameterClient(a, timeout_s=TIMEOUT_S, **kw) for a in addresses]
        # shared memory answers with views of its segment: copy them out, as the worker installs them
        self.replicas = [{n: torch.empty_like(t) for n, t in s.items()} for s in shares] if shared_memory else None
        self.grads = [{n: torch.ones_like(t) for n, t in s.items()} for s in shares]
        self.initial = shares
        self.versions = [0] * len(addresses)
        self.pulled: list[dict[str, torch.Tensor]] = [{} for _ in addresses]
        self.pool = ThreadPoolExecutor(len(addresses)) if len(addresses) > 1 else None

    def _one(self, i: int) -> None:
        reply, version, tensors = self.clients[i].push_pull(
            self.member, self.versions[i], 1, self.grads[i], timeout_s=TIMEOUT_S
        )
        assert reply.applied and version == self.versions[i] + 1, (reply, version)
        self.versions[i] = version
        self.pulled[i] = self._keep(i, tensors)

    def _keep(self, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.replicas is None:
            return tensors
        for n, t in tensors.items():
            self.replicas[i][n].copy_(t)
        return self.replicas[i]

    def used_shared_memory(self) -> bool:
        return all(c.shm is not None and c.shm.steps > 0 and not c.shm.off_reason for c in self.clients)

    def step_futures(self) -> float:
        """Both pushes in flight at once from this thread (``push_pull_async``), then both answers."""
        start = time.perf_counter()
        pending = [
            c.push_pull_async(self.member, self.versions[i], 1, self.grads[i], timeout_s=TIMEOUT_S)
            for i, c in enumerate(self.clients)
        ]
        for i, p in enumerate(pending):
            reply, version, tensors = p.result()
            assert reply.applied and version == self.versions[i] + 1, (reply, version)
            self.versions[i] = version
            self.pulled[i] = self._keep(i, tensors)
        return time.perf_counter() - start

    def step(self) -> float:
        start = time.perf_counter()
        if self.pool is None:
            self._one(0)
        else:
            for f in [self.pool.submit(self._one, i) for i in range(len(self.clients))]:
                f.result()
        return time.perf_counter() - start

    def check(self) -> None:
        for i, share in enumerate(self.initial):
            for n, t in share.items():
                expected = replica(t, self.versions[i])
                assert torch.equal(self.pulled[i][n], expected), f"lepton answered wrong values for {n}"

    def close(self) -> None:
        for c in self.clients:
            c.close()
        if self.pool is not None:
            self.pool.shutdown()


class RpcPath:
    def __init__(self, servers: list[str], shares: list[dict[str, torch.Tensor]]) -> None:
        self.servers = servers
        self.grads = [{n: torch.ones_like(t) for n, t in s.items()} for s in shares]
        self.initial = shares
        self.steps = 0
        self.pulled: list[dict[str, torch.Tensor]] = []

    def step(self) -> float:
        from torch.distributed import rpc

        start = time.perf_counter()
        futures = [rpc.rpc_async(s, _rpc_sgd, args=(g,)) for s, g in zip(self.servers, self.grads, strict=True)]
        self.pulled = [f.wait() for f in futures]
        elapsed = time.perf_counter() - start
        self.steps += 1
        return elapsed

    def check(self, steps_before: int = 0) -> None:
        for share, pulled in zip(self.initial, self.pulled, strict=True):
            for n, t in share.items():
                expected = replica(t, self.steps + steps_before)
                assert torch.equal(pulled[n], expected), f"torch RPC answered wrong values for {n}"


class GlooPath:
    def __init__(self, conns, size: int) -> None:
        self.conns = conns
        self.size = size

    def run(self, iters: int) -> list[float]:
        for c in self.conns:
            c.send((self.size, iters))
        times = self.conns[0].recv()
        self.conns[1].recv()
        return times


class TcpPath:
    def __init__(self, sock: socket.socket, size: int) -> None:
        self.sock = sock
        self.payload = bytes(size)
        self.back = bytearray(size)
        self.head = struct.pack("<Q", size)

    def step(self) -> float:
        start = time.perf_counter()
        self.sock.sendall(self.head)
        self.sock.sendall(self.payload)
        _recv_exactly(self.sock, memoryview(self.back))
        return time.perf_counter() - start


# --- the run -------------------------------------------------------------------------------------


def interleave(paths: dict[str, callable], iters: int, reps: int, warmup: int) -> dict[str, list[float]]:
    """Per path, the median seconds of ``iters`` round trips in each of ``reps`` repetitions."""
    names = list(paths)
    for name in names:
        paths[name](warmup)
    medians: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            medians[name].append(statistics.median(paths[name](iters)))
    return medians


def repeat(step) -> callable:
    return lambda iters: [step() for _ in range(iters)]


def summary(seconds: list[float], payload: int | None) -> dict[str, float]:
    med = statistics.median(seconds)
    out = {"median_ms": med * 1e3, "spread_pct": (max(seconds) - min(seconds)) / med * 100}
    if payload is not None:
        out["mb_per_s"] = payload / med / 1e6
    return out


_T0 = time.monotonic()


def log(what: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {what}", file=sys.stderr, flush=True)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=float, nargs="*", default=[64, 4], metavar="MIB",
                   help="push+pull sizes (none: only the tiny step)")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every process (default 1)")
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition: a smoke run")
    p.add_argument("--no-tunables", action="store_true", help="do not set GLIBC_TUNABLES")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument(
        "--checkpoint-every-steps", type=int, default=0, metavar="N",
        help="Lepton's servers write a periodic checkpoint every N updates (default 0: none)",
    )
    args = p.parse_args(argv)
    if not args.no_tunables and "GLIBC_TUNABLES" not in os.environ and argv is None:
        os.environ["GLIBC_TUNABLES"] = GLIBC_TUNABLES
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.quick:
        args.sizes, args.reps = [0.25], 1
    _threads(args.threads)
    iters = {size: max(2, min(50, int(256 // size))) for size in args.sizes}
    tiny_iters, warmup_tiny = (20, 5) if args.quick else (100, 50)

    ctx = mp.get_context("spawn")
    children: list = []
    conns: list = []

    def start(target, *a):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child, *a), daemon=True)
        proc.start()
        children.append(proc)
        conns.append(parent)
        return parent

    big = {size: parameters(size, seed=i) for i, size in enumerate(args.sizes)}
    halves = digits_halves()
    try:
        every = args.checkpoint_every_steps
        lepton_conns = {size: start(lepton_server, t, args.threads, every) for size, t in big.items()}
        tiny_conns = [start(lepton_server, h, args.threads, every) for h in halves]
        # the shared-memory path gets servers of its own (each path checks its own SGD steps)
        shm_conns = {size: start(lepton_server, t, args.threads, every) for size, t in big.items()}
        tiny_shm_conns = [start(lepton_server, h, args.threads, every) for h in halves]
        # torch RPC: rank 0 is this process; ps1 and ps2 hold every payload (keyed by name)
        rpc_port = free_port()
        rpc_shares = [{}, {}]
        for size, t in big.items():
            rpc_shares[0].update({f"{size}/{n}": v for n, v in t.items()})
        rpc_shares[0].update({f"tiny/{n}": v for n, v in halves[0].items()})
        rpc_shares[1].update({f"tiny/{n}": v for n, v in halves[1].items()})
        rpc_conns = [start(rpc_server, r, 3, rpc_port, rpc_shares[r - 1], args.threads) for r in (1, 2)]
        gloo_port = free_port()
        gloo_conns = [start(gloo_peer, r, gloo_port, args.threads) for r in (0, 1)]
        tcp_conn = start(tcp_echo)

        from torch.distributed import rpc

        log(f"{len(children)} processes started")
        rpc.init_rpc("client", rank=0, world_size=3, rpc_backend_options=_rpc_options(rpc_port))
        for c in rpc_conns + gloo_conns:
            assert c.recv() == "ready"
        tcp_sock = socket.create_connection(("127.0.0.1", tcp_conn.recv()))
        tcp_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log("torch RPC and gloo ready")

        results: dict[str, dict] = {}
        checks = []
        for size, tensors in big.items():
            payload = nbytes(tensors)
            lepton = LeptonPath([lepton_conns[size].recv()], [tensors])
            shared = LeptonPath([shm_conns[size].recv()], [tensors], shared_memory=True)
            rpcp = RpcPath(["ps1"], [{f"{size}/{n}": v for n, v in tensors.items()}])
            gloo = GlooPath(gloo_conns, payload)
            tcp = TcpPath(tcp_sock, payload)
            medians = interleave(
                {
                    "lepton": repeat(lepton.step),
                    "lepton shm": repeat(shared.step),
                    "torch RPC": repeat(rpcp.step),
                    "gloo": gloo.run,
                    "raw TCP": repeat(tcp.step),
                },
                iters[size],
                args.reps,
                warmup=2,
            )
            lepton.check()
            shared.check()
            assert shared.used_shared_memory(), "the shared-memory path fell back to gRPC"
            rpcp.check()
            checks += [lepton]
            log(f"push+pull {size:g} MiB done")
            results[f"push+pull {size:g} MiB"] = {n: summary(s, payload) for n, s in medians.items()}
            lepton.close()
            shared.close()
        addresses = [c.recv() for c in tiny_conns]
        tiny_bytes = sum(nbytes(h) for h in halves)
        lepton = LeptonPath(addresses, halves)
        shared = LeptonPath([c.recv() for c in tiny_shm_conns], halves, shared_memory=True)
        rpcp = RpcPath(["ps1", "ps2"], [{f"tiny/{n}": v for n, v in h.items()} for h in halves])
        gloo = GlooPath(gloo_conns, tiny_bytes)
        tcp = TcpPath(tcp_sock, tiny_bytes)
        medians = interleave(
            {"lepton": repeat(lepton.step), "lepton, no pool": repeat(lepton.step_futures),
             "lepton shm": repeat(shared.step), "lepton shm, no pool": repeat(shared.step_futures),
             "torch RPC": repeat(rpcp.step), "gloo": gloo.run, "raw TCP": repeat(tcp.step)}
            if hasattr(lepton.clients[0], "push_pull_async")  # (older trees, for before/after runs)
            else {"lepton": repeat(lepton.step), "torch RPC": repeat(rpcp.step), "gloo": gloo.run,
                  "raw TCP": repeat(tcp.step)},
            tiny_iters, args.reps, warmup=warmup_tiny,
        )
        lepton.check()
        shared.check()
        assert shared.used_shared_memory(), "the shared-memory path fell back to gRPC"
        rpcp.check()
        lepton.close()
        shared.close()
        results[f"digits-MLP step ({tiny_bytes / 1000:.0f} KB) through 2 servers"] = {
            n: summary(s, None) for n, s in medians.items()
        }
        for c in gloo_conns:
            c.send(None)
        rpc.shutdown()
    finally:
        for c in conns:
            try:
                c.send("stop")
            except (OSError, ValueError):
                pass
        for proc in children:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": load_average(),
        "cpus": os.cpu_count(),
        "threads_per_process": args.threads,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "(none)"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "repetitions": args.reps,
    }
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    paths = ["lepton", "lepton, no pool", "lepton shm", "lepton shm, no pool", "torch RPC", "gloo", "raw TCP"]
    print(f"\n| what | {' | '.join(paths)} | lepton / torch RPC | lepton shm / torch RPC |")
    print(f"|---|{'---|' * (len(paths) + 2)}")
    for what, row in results.items():
        if "mb_per_s" in row["lepton"]:
            cells = [f"{row[n]['mb_per_s']:,.0f} MB/s ±{row[n]['spread_pct']:.0f}%" if n in row else "—" for n in paths]
            ratio = " | ".join(
                f"{row[n]['mb_per_s'] / row['torch RPC']['mb_per_s']:.2f}×" for n in ("lepton", "lepton shm")
            )
        else:
            cells = [f"{row[n]['median_ms']:.2f} ms ±{row[n]['spread_pct']:.0f}%" if n in row else "—" for n in paths]
            ratio = " | ".join(
                " / ".join(
                    f"{row[n]['median_ms'] / row['torch RPC']['median_ms']:.2f}×"
                    for n in group
                    if n in row
                )
                for group in (("lepton", "lepton, no pool"), ("lepton shm", "lepton shm, no pool"))
            )
        print(f"| {what} | {' | '.join(cells)} | {ratio} |")
    print("\nMB/s: parameter bytes (10^6) per round trip; ± is (max - min) / median over repetitions; "
          "ratio: throughput for push+pull, time for the step (lower is better).")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
