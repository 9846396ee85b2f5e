"""What one liveness message costs a Python gRPC server: unary calls against messages on long-lived
bidirectional streams, on the synchronous server and on grpc.aio.

The server runs in its own process with the Coordinator's Heartbeat/HeartbeatStream handlers
answering a fixed reply (no job behind them); ``--clients`` asyncio clients in another process send
``--seconds`` of back-to-back heartbeats, each either as a unary call or as one message on its own
stream. Printed: messages/s the server sustained and its CPU microseconds per message (the
number that sets how many members one core can keep alive), interleaved ``--repeats`` times.

    python bench/grpc_messages.py --clients 200 --seconds 5 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc import aio

from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cpb_grpc

REPLY = cpb.HeartbeatResponse(job_state=cpb.JOB_STATE_TRAINING, layout_version=1)
STREAM_REPLY = cpb.HeartbeatStreamResponse(heartbeat=REPLY)


class SyncServicer(cpb_grpc.CoordinatorServicer):
    def Heartbeat(self, request, context):
        return REPLY

    def HeartbeatStream(self, request_iterator, context):
        for _ in request_iterator:
            yield STREAM_REPLY


class AioServicer(cpb_grpc.CoordinatorServicer):
    async def Heartbeat(self, request, context):
        return REPLY

    async def HeartbeatStream(self, request_iterator, context):
        async for _ in request_iterator:
            yield STREAM_REPLY


def serve(kind: str, clients: int, ready: Path) -> None:
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=clients + 16))
        cpb_grpc.add_CoordinatorServicer_to_server(SyncServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        ready.write_text(str(port))
        server.wait_for_termination()
        return

    async def main() -> None:
        server = aio.server()
        cpb_grpc.add_CoordinatorServicer_to_server(AioServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(main())


async def drive(address: str, mode: str, clients: int, seconds: float) -> int:
    request = cpb.HeartbeatRequest()
    beat = cpb.HeartbeatStreamRequest(heartbeat=request)
    count = 0
    async with aio.insecure_channel(address) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        end = time.monotonic() + seconds

        async def unary() -> None:
            nonlocal count
            while time.monotonic() < end:
                await stub.Heartbeat(request, timeout=30)
                count += 1

        async def stream() -> None:
            nonlocal count
            call = stub.HeartbeatStream(timeout=seconds + 30)
            while time.monotonic() < end:
                await call.write(beat)
                await call.read()
                count += 1
            await call.done_writing()

        await asyncio.gather(*(unary() if mode == "unary" else stream() for _ in range(clients)))
    return count


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(kind: str, mode: str, args: argparse.Namespace) -> tuple[float, float]:
    ready = Path(f"/tmp/grpc-messages-{os.getpid()}.port")
    ready.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, __file__, "--_serve", kind, "--clients", str(args.clients),
                               "--_ready", str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() or not ready.read_text():
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        address = f"127.0.0.1:{ready.read_text()}"
        before, start = _cpu(server.pid), time.monotonic()
        out = subprocess.run([sys.executable, __file__, "--_drive", address, "--_mode", mode, "--clients",
                              str(args.clients), "--seconds", str(args.seconds)], capture_output=True, text=True,
                             check=True, timeout=args.seconds + 120)
        wall, cpu = time.monotonic() - start, _cpu(server.pid) - before
        count = json.loads(out.stdout)
        return count / wall, cpu / count * 1e6
    finally:
        server.kill()
        server.wait()
        ready.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--_serve", dest="serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_ready", dest="ready", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_drive", dest="drive", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_mode", dest="mode", default="unary", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.clients, Path(args.ready))
        return 0
    if args.drive:
        print(json.dumps(asyncio.run(drive(args.drive, args.mode, args.clients, args.seconds))))
        return 0
    combos = [(k, m) for k in ("sync", "aio") for m in ("unary", "stream")]
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {c: [] for c in combos}
    for _ in range(args.repeats):
        for kind, mode in combos:
            rows[(kind, mode)].append(run_once(kind, mode, args))
    print(f"# {args.clients} clients, {args.seconds:g} s, {args.repeats} interleaved repeats, {os.cpu_count()} cpus")
    print("server | message | msgs/s median (spread) | server cpu µs per msg median (spread)")
    for (kind, mode), values in rows.items():
        rates, costs = [v[0] for v in values], [v[1] for v in values]
        print(f"{kind} | {mode} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | "
              f"{statistics.median(costs):.0f} ({min(costs):.0f}-{max(costs):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
