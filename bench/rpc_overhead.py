"""What Lepton's server stack adds to one small unary call: a bare grpcio server against
``lepton.rpc.Server`` with its interceptors (call limits, error mapping; then metrics; then auth),
every server in its own process on loopback, interleaved.

Each server answers ``/lepton.v1.ParameterServer/PushPullUnary`` with a fixed 10 KB reply after
decoding the request with the data plane's decoder (``lepton.data_wire.decode_push``), so the
handler's own work is the same everywhere and the difference is the stack around it. The client
sends a 10 KB push (one message) back to back from one thread. Printed per variant: the median
round trip and the server's CPU microseconds per call (from /proc, all its threads), each the
median over repetitions, with the spread (max - min) / median.

    python bench/rpc_overhead.py                # 5 repetitions of 2,000 calls
    python bench/rpc_overhead.py --quick        # seconds: the smoke test's run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

METHOD = "/lepton.v1.ParameterServer/PushPullUnary"
SERVICE = "lepton.v1.ParameterServer"
TOKEN = "bench-token-0123456789abcdef"
PAYLOAD = 10_000
VARIANTS = ("bare grpc", "lepton", "lepton + metrics", "lepton + metrics + auth")


def _push_message() -> bytes:
    import torch

    from lepton import data_wire
    from lepton.control_wire import member_ref
    from lepton.domain import MemberId
    from lepton.v1 import parameter_server_pb2 as ppb

    header = ppb.PushHeader(member=member_ref(MemberId("bench-worker", 1)), base_version=0, sample_count=1,
                            request_id="r", tensors=1)
    grads = [("w", torch.ones(PAYLOAD // 4))]
    (message,) = data_wire.encode_push(header, grads, PAYLOAD)
    return message


def _handlers(reply: bytes) -> grpc.GenericRpcHandler:
    from lepton import data_wire

    def answer(request, context):  # noqa: ANN001
        assert request.header is not None
        return reply

    return grpc.method_handlers_generic_handler(
        SERVICE, {"PushPullUnary": grpc.unary_unary_rpc_method_handler(answer, data_wire.decode_push, bytes)}
    )


def serve(conn, variant: str) -> None:
    reply = bytes(PAYLOAD)
    if variant == "bare grpc":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((_handlers(reply),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        conn.send(f"127.0.0.1:{port}")
        conn.recv()
        server.stop(0)
        return
    from prometheus_client import CollectorRegistry

    from lepton.auth import Principal, TokenTable
    from lepton.rpc import Server
    from lepton.security import INSECURE, Security

    security = (
        Security(auth=TokenTable({TOKEN: Principal("bench", "worker", "bench-*")})) if "auth" in variant else INSECURE
    )
    registry = CollectorRegistry() if "metrics" in variant else None
    add = lambda _servicer, s: s.add_generic_rpc_handlers((_handlers(reply),))  # noqa: E731
    lepton = Server("127.0.0.1:0", [(add, None, SERVICE)], registry=registry, security=security,
                    reflection_enabled=False)
    lepton.start()
    conn.send(lepton.address)
    conn.recv()
    lepton.stop(0)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000, help="calls per variant and repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="100 calls, 1 repetition: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.calls, args.reps = 100, 1
    from lepton.rpc import channel_options

    ctx = mp.get_context("spawn")
    procs, conns, calls = {}, {}, {}
    message = _push_message()
    try:
        for v in VARIANTS:
            parent, child = ctx.Pipe()
            procs[v] = ctx.Process(target=serve, args=(child, v), daemon=True)
            procs[v].start()
            conns[v] = parent
        for v in VARIANTS:
            channel = grpc.insecure_channel(conns[v].recv(), options=channel_options())
            metadata = (("authorization", f"Bearer {TOKEN}"),) if "auth" in v else None
            stub = channel.unary_unary(METHOD, request_serializer=bytes, response_deserializer=bytes)
            calls[v] = (stub, metadata)
            for _ in range(50):  # warm-up
                assert len(stub(message, timeout=10, metadata=metadata)) == PAYLOAD
        latency: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for rep in range(args.reps):
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[: rep % len(VARIANTS)]
            for v in order:
                stub, metadata = calls[v]
                times = []
                before = cpu_s(procs[v].pid)
                for _ in range(args.calls):
                    start = time.perf_counter()
                    stub(message, timeout=10, metadata=metadata)
                    times.append(time.perf_counter() - start)
                cpu[v].append((cpu_s(procs[v].pid) - before) / args.calls)
                latency[v].append(statistics.median(times))
    finally:
        for c in conns.values():
            try:
                c.send("stop")
            except (OSError, ValueError):
                pass
        for proc in procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    print(f"load_average={' '.join(Path('/proc/loadavg').read_text().split()[:3])} cpus={os.cpu_count()} "
          f"calls={args.calls} repetitions={args.reps} grpcio={grpc.__version__}")
    print("\n| server | round trip | server CPU per call |\n|---|---|---|")

    def cell(xs: list[float], unit: float, fmt: str) -> str:
        med = statistics.median(xs)
        return f"{med * unit:{fmt}} ±{(max(xs) - min(xs)) / med * 100:.0f}%"

    for v in VARIANTS:
        print(f"| {v} | {cell(latency[v], 1e6, '.0f')} µs | {cell(cpu[v], 1e6, '.0f')} µs |")
    print("\n± is (max - min) / median over repetitions; CPU: all the server process's threads "
          "(clock ticks, so short runs are coarse).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
