"""Push-and-pull throughput: Lepton's PushPull RPC against a raw gRPC echo, side by side in one run.

What is measured:
    *lepton*: one ``ParameterClient.push_pull`` round trip against a real ParameterServer (the
    ``lepton.rpc.Server`` with its interceptor, the servicer and a ``ParameterServer`` in async
    mode with SGD). The worker pushes a gradient for every parameter (``--mib`` MiB of float32 in
    4 tensors), the server checks and applies it, and streams all parameters back. Everything the
    library does is inside the timer: encoding, chunking, protobuf, checks, the SGD step, the
    snapshot, decoding into fresh tensors.

    *raw*: the transport floor. A stream-stream method registered with
    ``grpc.method_handlers_generic_handler`` and identity serializers (bytes in, bytes out, no
    protobuf). The client streams ``--mib`` MiB as 1 MiB ``bytes`` chunks (sliced from one payload,
    which copies, as Lepton's encoder does); the server keeps the chunks and, once the request stream
    ends, streams the same objects back; the client copies them into one fresh buffer.

    Both use Lepton's channel and server options (``lepton.rpc.channel_options`` /
    ``server_options``) and the same 1 MiB chunking. MB/s counts 10^6 payload bytes per second and
    counts BOTH directions: (bytes pushed + bytes pulled) / round-trip seconds.

    Warm-up round trips of each path come first and are not reported; measured round trips then
    alternate lepton, raw, lepton, raw... so that drift in machine load hits both paths alike. Every
    round trip's result is checked outside the timer (exact SGD values and version for lepton, byte
    equality for raw), so a broken path cannot pass as a fast one.

Caveats printed with the results: client and servers share one process (and so the GIL) and talk
over loopback (127.0.0.1). The glibc allocator settings (``GLIBC_TUNABLES``) are read by glibc at
process start, so set them in the environment of the command, e.g.::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:\\
glibc.malloc.trim_threshold=1073741824 python bench/pushpull.py

How to run::

    python bench/pushpull.py                       # 64 MiB, 2 warm-up + 7 measured runs each
    python bench/pushpull.py --mib 16 --runs 5 --json pushpull.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import torch

from lepton.clients import MemberId, ParameterClient
from lepton.rpc import MiB, Server, dial, server_options
from ps_server.parameter_server import ParameterServer
from ps_server.roster import WorkerEntry
from ps_server.servicer import ParameterServerServicer, registration

TENSOR_COUNT = 4
ROW_ELEMENTS = 1024
CHUNK_BYTES = MiB  # the raw path's chunk size, equal to lepton.codec.DEFAULT_CHUNK_BYTES
# A power of two and a gradient of 1.0: p - lr * g is one exactly rounded subtraction on both sides.
LEARNING_RATE = 2.0**-10
GRADIENT_VALUE = 1.0
CALL_TIMEOUT_S = 60.0
MAX_MESSAGE_MIB = 8  # Lepton's default; both paths send ~1 MiB messages
ECHO_METHOD = "/bench.v1.Echo/Echo"
WORKER = MemberId("bench-worker", 1)


@dataclass(frozen=True)
class PathStats:
    """Summary of one path's measured round trips."""

    name: str
    runs: int
    payload_bytes_per_round_trip: int
    median_mb_s: float
    min_mb_s: float
    max_mb_s: float
    median_round_trip_s: float
    round_trip_s: list[float]


# --- Lepton path ---------------------------------------------------------------------------------


def make_parameters(mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``TENSOR_COUNT`` float32 tensors of random values totalling ``mib`` MiB."""
    rows = mib * MiB // (TENSOR_COUNT * ROW_ELEMENTS * 4)
    if rows < 1:
        raise SystemExit(f"--mib must be at least 1, got {mib}")
    generator = torch.Generator().manual_seed(seed)
    return {
        f"layer{i}.weight": torch.randn(rows, ROW_ELEMENTS, generator=generator)
        for i in range(TENSOR_COUNT)
    }


def start_parameter_server(params: dict[str, torch.Tensor]) -> tuple[Server, ParameterServer]:
    """A loaded, serving ParameterServer on 127.0.0.1:0 that accepts pushes from ``WORKER``."""
    node = ParameterServer(member_id="bench-ps")
    node.load(params, "sgd", LEARNING_RATE, {}, "async", step_timeout_s=CALL_TIMEOUT_S)
    node.update_roster([WorkerEntry(WORKER.member_id, WORKER.incarnation, True)])
    server = Server(
        "127.0.0.1:0",
        [registration(ParameterServerServicer(node))],
        max_message_mib=MAX_MESSAGE_MIB,
        reflection_enabled=False,
    )
    server.start()
    return server, node


class LeptonRoundTrip:
    """Times ``ParameterClient.push_pull`` and checks every answer against a local SGD replica.

    Raises AssertionError when the server's answer differs from the expected parameters.
    """

    def __init__(self, address: str, params: dict[str, torch.Tensor]) -> None:
        self._client = ParameterClient(address, timeout_s=CALL_TIMEOUT_S)
        self._grads = {name: torch.full_like(p, GRADIENT_VALUE) for name, p in params.items()}
        self._expected = {name: p.clone() for name, p in params.items()}
        self._version = 0
        self.payload_bytes = 2 * sum(g.numel() * g.element_size() for g in self._grads.values())

    def __call__(self) -> float:
        start = time.perf_counter()
        reply, version, pulled = self._client.push_pull(
            WORKER, self._version, 1, self._grads, timeout_s=CALL_TIMEOUT_S
        )
        elapsed = time.perf_counter() - start
        self._check(reply.applied, reply.version, version, pulled)
        return elapsed

    def _check(self, applied: bool, push_version: int, version: int, pulled: dict[str, torch.Tensor]) -> None:
        expected_version = self._version + 1
        assert applied, "the push was not applied"
        assert push_version == version == expected_version, (
            f"versions: push {push_version}, pull {version}, expected {expected_version}"
        )
        assert pulled.keys() == self._expected.keys(), f"pulled {sorted(pulled)}"
        for name, want in self._expected.items():
            want.add_(self._grads[name], alpha=-LEARNING_RATE)  # what torch.optim.SGD does
            got = pulled[name]
            assert got.dtype == want.dtype and got.shape == want.shape, f"{name}: {got.dtype} {got.shape}"
            assert torch.equal(got, want), f"{name}: pulled values differ from one SGD step"
        self._version = expected_version

    @property
    def version(self) -> int:
        return self._version

    def close(self) -> None:
        self._client.close()


# --- raw gRPC path -------------------------------------------------------------------------------


def _identity(data: bytes) -> bytes:
    return data


def _echo(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    # Receive everything first, then answer, as PushPull does (the push is whole before the pull).
    chunks = list(request_iterator)
    yield from chunks


def start_echo_server() -> tuple[grpc.Server, str]:
    """A raw bytes echo service on 127.0.0.1:0 with Lepton's server options."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="echo"),
        options=server_options(MAX_MESSAGE_MIB),
    )
    handler = grpc.stream_stream_rpc_method_handler(
        _echo, request_deserializer=_identity, response_serializer=_identity
    )
    service, method = ECHO_METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {method: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        raise RuntimeError("cannot listen on 127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


class RawRoundTrip:
    """Times one echo of ``mib`` MiB in 1 MiB chunks and checks the bytes that came back.

    Raises AssertionError when the echo differs from what was sent.
    """

    def __init__(self, address: str, mib: int) -> None:
        self._channel = dial(address, max_message_mib=MAX_MESSAGE_MIB)
        self._echo = self._channel.stream_stream(
            ECHO_METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        self._payload = os.urandom(mib * MiB)
        self.payload_bytes = 2 * len(self._payload)

    def _chunks(self) -> Iterator[bytes]:
        payload = self._payload
        for offset in range(0, len(payload), CHUNK_BYTES):
            yield payload[offset : offset + CHUNK_BYTES]

    def __call__(self) -> float:
        start = time.perf_counter()
        received = bytearray(len(self._payload))
        offset = 0
        for chunk in self._echo(self._chunks(), timeout=CALL_TIMEOUT_S):
            received[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        elapsed = time.perf_counter() - start
        assert offset == len(self._payload), f"echoed {offset} of {len(self._payload)} bytes"
        assert received == self._payload, "echoed bytes differ from those sent"
        return elapsed

    def close(self) -> None:
        self._channel.close()


# --- measuring and reporting ---------------------------------------------------------------------


def measure(
    paths: dict[str, Callable[[], float]], warmup: int, runs: int
) -> dict[str, list[float]]:
    """Warm-up calls of every path, then ``runs`` measured calls of each, interleaved."""
    for _ in range(warmup):
        for round_trip in paths.values():
            round_trip()
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(runs):
        for name, round_trip in paths.items():
            seconds[name].append(round_trip())
    return seconds


def summarize(name: str, seconds: list[float], payload_bytes: int) -> PathStats:
    rates = [payload_bytes / 1e6 / s for s in seconds]
    return PathStats(
        name=name,
        runs=len(seconds),
        payload_bytes_per_round_trip=payload_bytes,
        median_mb_s=statistics.median(rates),
        min_mb_s=min(rates),
        max_mb_s=max(rates),
        median_round_trip_s=statistics.median(seconds),
        round_trip_s=seconds,
    )


def environment(args: argparse.Namespace) -> dict[str, object]:
    return {
        "mib": args.mib,
        "tensors": TENSOR_COUNT,
        "dtype": "float32",
        "warmup_runs_per_path": args.warmup,
        "measured_runs_per_path": args.runs,
        "chunk_bytes": CHUNK_BYTES,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES") or "default",
        "transport": "loopback 127.0.0.1",
        "processes": "client and both servers in one process (shared GIL)",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "torch": torch.__version__,
    }


def print_report(env: dict[str, object], stats: list[PathStats]) -> None:
    mib = env["mib"]
    print(f"push-and-pull round trip of {mib} MiB float32 ({env['tensors']} tensors) up and {mib} MiB down")
    print("MB/s = 10^6 payload bytes per second, counting BOTH directions (pushed + pulled) per round trip")
    print(f"{env['processes']}; {env['transport']}; {env['cpus']} CPUs")
    print(f"allocator: GLIBC_TUNABLES={env['glibc_tunables']}")
    print(
        f"{env['warmup_runs_per_path']} warm-up round trips per path (not reported), then "
        f"{env['measured_runs_per_path']} measured per path, interleaved; every answer checked"
    )
    print(f"python {env['python']}, grpcio {env['grpcio']}, torch {env['torch']}")
    print()
    header = f"{'path':<8} {'median MB/s':>12} {'min MB/s':>10} {'max MB/s':>10} {'median s/trip':>14}"
    print(header)
    print("-" * len(header))
    for s in stats:
        print(
            f"{s.name:<8} {s.median_mb_s:>12,.0f} {s.min_mb_s:>10,.0f} {s.max_mb_s:>10,.0f} "
            f"{s.median_round_trip_s:>14.3f}"
        )
    by_name = {s.name: s for s in stats}
    ratio = by_name["lepton"].median_mb_s / by_name["raw"].median_mb_s
    print()
    print(f"lepton / raw (medians): {ratio:.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="parameter set size in MiB (default 64)")
    parser.add_argument("--runs", type=int, default=7, help="measured round trips per path (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up round trips per path (default 2)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.mib < 1:
        parser.error("need --runs >= 1, --warmup >= 0, --mib >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = make_parameters(args.mib)
    ps_server, node = start_parameter_server(params)
    echo_server, echo_address = start_echo_server()
    lepton = LeptonRoundTrip(ps_server.address, params)
    raw = RawRoundTrip(echo_address, args.mib)
    try:
        seconds = measure({"lepton": lepton, "raw": raw}, args.warmup, args.runs)
        status = node.status()
        calls = args.warmup + args.runs
        assert status.version == lepton.version == calls, f"server version {status.version}, calls {calls}"
        assert status.bytes_pushed == status.bytes_pulled == calls * lepton.payload_bytes // 2
    finally:
        lepton.close()
        raw.close()
        ps_server.stop(0.5)
        echo_server.stop(0.5).wait(2)
    env = environment(args)
    stats = [
        summarize("lepton", seconds["lepton"], lepton.payload_bytes),
        summarize("raw", seconds["raw"], raw.payload_bytes),
    ]
    print_report(env, stats)
    if args.json is not None:
        ratio = stats[0].median_mb_s / stats[1].median_mb_s
        report = {"environment": env, "paths": [asdict(s) for s in stats], "lepton_over_raw": ratio}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
