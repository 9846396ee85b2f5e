"""Coordinator at scale: N simulated workers against one real coordinator process.

What runs:
    *coordinator*: ``lepton coordinator`` in its own process (digits data set, many small shards,
    enough epochs that the job outlives the run), with a SQLite ``--state-dir`` or without one.

    *parameter servers*: ``--servers`` simulated servers that register, read their assignment, report
    ready and heartbeat at the heartbeat interval with a rising version, echoing the roster version
    and answering no checkpoint orders (checkpoints are off).

    *workers*: ``--workers`` simulated workers. Each registers, heartbeats every heartbeat interval
    (default 0.5 s, 2 Hz) or at the interval the coordinator's replies direct, as the real worker
    does (``--protocol stream``, the default: on one HeartbeatStream per worker, skipping a beat
    when a lease, progress or completion call succeeded within the last interval, but never more
    than worker/heartbeat.py ``may_skip`` allows; ``--protocol unary``: the same with one
    Heartbeat call per beat; ``--protocol legacy``: one Heartbeat call every interval, never
    skipped nor directed, as workers did before) and, beside it, leases a shard (a long poll of
    ``--lease-wait`` s), reports progress ``--progress`` times ``--progress-interval`` apart and
    completes it, then leases again (WAIT answers are obeyed).

    Clients are asyncio gRPC (``grpc.aio``) split over ``--client-procs`` processes so that the
    clients' own event loops do not dominate the latencies they measure.

What is printed, one row per configuration (all configurations run interleaved ``--repeats`` times):
    heartbeat latency p50/p99/max as the clients saw it (a unary call, or one message's round trip
    on the stream), heartbeats skipped, RPC counts and failures by status code,
    the coordinator's CPU share, members declared dead and the job's state at the end.

How to run::

    python bench/coordinator_scale.py                                  # 300 workers, 40 s, state dir on and off
    python bench/coordinator_scale.py --workers 1000 --seconds 40 --repeats 2 --json scale.json
    python bench/coordinator_scale.py --workers 20 --seconds 5 --configs state   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc import aio

from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cpb_grpc

try:
    from worker.heartbeat import may_skip
except ImportError:  # run against an older tree's coordinator: --protocol legacy only
    may_skip = None

CALL_TIMEOUT_S = 10.0
RETRIES_WHEN_REFUSED = 7
TERMINAL_STATES = {cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED}


# --------------------------------------------------------------------------------------------- clients


@dataclass
class ClientTally:
    """What one client process saw."""

    heartbeat_ms: list[float] = field(default_factory=list)
    heartbeat_at: list[float] = field(default_factory=list)  # when each was sent, seconds into the run
    started: float = field(default_factory=time.monotonic)
    calls: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    shards_completed: int = 0
    heartbeats_skipped: int = 0
    directed_interval_s: float = 0.0  # the longest interval the coordinator directed


async def _call(tally: ClientTally, name: str, method, request):  # type: ignore[no-untyped-def]
    """One call; RESOURCE_EXHAUSTED (refused by the coordinator's limits, so nothing changed) is
    retried after a full-jitter backoff, as lepton.coordinator_client does."""
    for attempt in range(RETRIES_WHEN_REFUSED + 1):
        tally.calls[name] += 1
        try:
            return await method(request, timeout=CALL_TIMEOUT_S)
        except aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == RETRIES_WHEN_REFUSED:
                tally.failures[f"{name}:{exc.code().name}"] += 1
                return None
            tally.failures[f"{name}:RESOURCE_EXHAUSTED(retried)"] += 1
            await asyncio.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))
    return None


async def _register(stub, tally: ClientTally, role: int, address: str = ""):  # type: ignore[no-untyped-def]
    while True:
        reply = await _call(
            tally, "RegisterMember", stub.RegisterMember,
            cpb.RegisterMemberRequest(role=role, address=address, hostname="sim", pid=os.getpid()),
        )
        if reply is not None:
            return reply.member
        await asyncio.sleep(0.2)


async def _server(stub, tally: ClientTally, index: int, interval_s: float, end: float) -> None:
    """A simulated parameter server: register, assignment, ready, heartbeats with a rising version."""
    member = await _register(stub, tally, common.ROLE_PARAMETER_SERVER, f"127.0.0.1:{50000 + index}")
    layout_version = 0
    while layout_version == 0 and time.monotonic() < end:
        try:
            async for msg in stub.GetAssignment(cpb.GetAssignmentRequest(member=member), timeout=60):
                layout_version = layout_version or msg.layout_version
        except aio.AioRpcError as exc:
            tally.failures[f"GetAssignment:{exc.code().name}"] += 1
            await asyncio.sleep(0.2)
    await _call(
        tally, "ReportReady", stub.ReportReady,
        cpb.ReportReadyRequest(member=member, layout_version=layout_version, version=0),
    )
    version, roster = 0, 0
    while time.monotonic() < end:
        version += 10
        reply = await _call(
            tally, "Heartbeat", stub.Heartbeat,
            cpb.HeartbeatRequest(member=member, version=version, roster_version=roster),
        )
        if reply is not None:
            roster = reply.roster_version
            if reply.job_state in TERMINAL_STATES:
                return
        await asyncio.sleep(interval_s)


class _Renewals:
    """When each simulated worker's last renewing call (lease, progress, completion) was sent."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}

    async def call(self, tally: ClientTally, member, name: str, method, request):  # type: ignore[no-untyped-def]
        sent = time.monotonic()
        reply = await _call(tally, name, method, request)
        if reply is not None:
            self.sent[member.member_id] = max(sent, self.sent.get(member.member_id, sent))
        return reply


class _Stream:
    """One HeartbeatStream, reopened after it fails."""

    def __init__(self, stub) -> None:  # type: ignore[no-untyped-def]
        self._stub = stub
        self._call = None

    async def beat(self, tally: ClientTally, request: cpb.HeartbeatRequest):  # type: ignore[no-untyped-def]
        tally.calls["HeartbeatStream:message"] += 1  # not a call: counted apart
        try:
            if self._call is None:
                tally.calls["HeartbeatStream"] += 1
                self._call = self._stub.HeartbeatStream(timeout=3600)
            await self._call.write(cpb.HeartbeatStreamRequest(heartbeat=request))
            reply = await asyncio.wait_for(self._call.read(), CALL_TIMEOUT_S)
        except (TimeoutError, aio.AioRpcError, asyncio.InvalidStateError) as exc:
            # InvalidStateError: a write after the server ended the call (it ends with the beat's error)
            code = exc.code().name if isinstance(exc, aio.AioRpcError) else type(exc).__name__
            tally.failures[f"HeartbeatStream:{code}"] += 1
            if self._call is not None:
                self._call.cancel()
            self._call = None
            return None
        if reply is aio.EOF:
            self._call = None
            return None
        return reply.heartbeat

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()


async def _worker_heartbeats(  # type: ignore[no-untyped-def]
    stub, tally: ClientTally, member, interval_s: float, end: float, protocol: str, renewals: _Renewals,
    directed: bool = True,
) -> None:
    await asyncio.sleep(random.uniform(0, interval_s))
    next_at = time.monotonic()
    stream = _Stream(stub) if protocol == "stream" else None
    skipped_in_a_row = 0
    last_beat = time.monotonic()
    try:
        while time.monotonic() < end:
            next_at += interval_s
            renewed = renewals.sent.get(member.member_id)
            if protocol != "legacy" and may_skip(renewed, last_beat, interval_s, skipped_in_a_row, time.monotonic()):
                skipped_in_a_row += 1
                tally.heartbeats_skipped += 1
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                continue
            skipped_in_a_row = 0
            last_beat = time.monotonic()
            start = time.perf_counter()
            request = cpb.HeartbeatRequest(member=member)
            if stream is not None:
                reply = await stream.beat(tally, request)
            else:
                reply = await _call(tally, "Heartbeat", stub.Heartbeat, request)
            if reply is not None:
                tally.heartbeat_ms.append((time.perf_counter() - start) * 1e3)
                tally.heartbeat_at.append(last_beat - tally.started)
                if reply.job_state in TERMINAL_STATES:
                    return
                if directed and reply.heartbeat_interval_s > 0 and reply.heartbeat_interval_s != interval_s:
                    next_at += reply.heartbeat_interval_s - interval_s
                    interval_s = reply.heartbeat_interval_s
                    tally.directed_interval_s = max(tally.directed_interval_s, interval_s)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        if stream is not None:
            stream.close()


async def _worker_shards(  # type: ignore[no-untyped-def]
    stub, tally: ClientTally, member, args: argparse.Namespace, end: float, renewals: _Renewals,
) -> None:
    while time.monotonic() < end:
        reply = await renewals.call(
            tally, member, "LeaseShard", stub.LeaseShard,
            cpb.LeaseShardRequest(member=member, max_wait_s=args.lease_wait),
        )
        if reply is None:
            await asyncio.sleep(0.5)
            continue
        if reply.outcome != cpb.LEASE_OUTCOME_GRANTED:
            if reply.outcome in (cpb.LEASE_OUTCOME_JOB_DONE, cpb.LEASE_OUTCOME_EVALUATE):
                return
            await asyncio.sleep(max(reply.retry_after_s, 0.05))
            continue
        lease = reply.lease
        size = lease.end - lease.start
        done = lease.offset
        for k in range(args.progress):
            await asyncio.sleep(args.progress_interval)
            step = max(0, (size - lease.offset) * (k + 1) // (args.progress + 1) + lease.offset - done)
            done += step
            await renewals.call(
                tally, member, "ReportProgress", stub.ReportProgress,
                cpb.ReportProgressRequest(
                    member=member, epoch=lease.epoch, shard=lease.shard, offset=done, loss=1.0,
                    samples=step, lease_id=lease.lease_id,
                ),
            )
        await asyncio.sleep(args.progress_interval)
        completed = await renewals.call(
            tally, member, "CompleteShard", stub.CompleteShard,
            cpb.CompleteShardRequest(
                member=member, epoch=lease.epoch, shard=lease.shard, loss=1.0, samples=size - done,
                lease_id=lease.lease_id,
            ),
        )
        if completed is not None:
            tally.shards_completed += 1


async def _worker(stub, tally: ClientTally, args: argparse.Namespace, end: float) -> None:  # type: ignore[no-untyped-def]
    member = await _register(stub, tally, common.ROLE_WORKER)
    renewals = _Renewals()
    await asyncio.gather(
        _worker_heartbeats(
            stub, tally, member, args.heartbeat_interval, end, args.protocol, renewals, args.protocol != "legacy"
        ),
        _worker_shards(stub, tally, member, args, end, renewals),
    )


async def _client_part(args: argparse.Namespace) -> ClientTally:
    tally = ClientTally()
    end = time.monotonic() + args.seconds
    async with aio.insecure_channel(args.address) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        tasks = [_server(stub, tally, i, args.heartbeat_interval, end) for i in range(args.servers)]
        tasks += [_worker(stub, tally, args, end) for _ in range(args.workers)]
        await asyncio.gather(*tasks)
    return tally


def client_main(args: argparse.Namespace) -> None:
    tally = asyncio.run(_client_part(args))
    Path(args.client_out).write_text(json.dumps({
        "heartbeat_ms": tally.heartbeat_ms, "heartbeat_at": tally.heartbeat_at, "calls": tally.calls,
        "failures": tally.failures,
        "shards_completed": tally.shards_completed, "heartbeats_skipped": tally.heartbeats_skipped,
        "directed_interval_s": tally.directed_interval_s,
    }))


# --------------------------------------------------------------------------------------------- driver


@dataclass
class RunResult:
    config: str
    protocol: str
    workers: int
    seconds: float
    heartbeats: int
    heartbeat_p50_ms: float
    heartbeat_p99_ms: float
    heartbeat_p99_after_warmup_ms: float
    heartbeat_max_ms: float
    heartbeats_skipped: int
    directed_interval_s: float
    calls: int
    failures: dict[str, int]
    shards_completed: int
    coordinator_cpu_share: float
    members_declared_dead: int
    dead_servers: int
    job_state: str


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _start_coordinator(work: Path, args: argparse.Namespace, state: bool) -> tuple[subprocess.Popen, str]:
    ready = work / "coordinator.ready"
    command = [
        sys.executable, "-m", "lepton", "coordinator", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
        "--parameter-servers", str(args.servers), "--dataset", "digits", "--shards", str(args.shards),
        "--epochs", "1000", "--heartbeat-interval", str(args.heartbeat_interval),
        "--heartbeat-timeout", str(args.heartbeat_timeout), "--lease-timeout", str(args.lease_timeout),
        "--checkpoint-every", "0", "--log-level", "warning",
    ]
    if state:
        command += ["--state-dir", str(work / "state")]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(work / "coordinator.log", "wb"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"the coordinator exited {child.returncode}; see {work / 'coordinator.log'}")
        if ready.exists():
            facts = json.loads(ready.read_text())
            if "address" in facts:
                return child, facts["address"]
            raise SystemExit(f"the coordinator refused to start: {facts}")
        time.sleep(0.05)
    child.kill()
    raise SystemExit("the coordinator did not become ready within 120 s")


def _status(address: str) -> cpb.GetStatusResponse:
    with grpc.insecure_channel(address) as channel:
        return cpb_grpc.CoordinatorStub(channel).GetStatus(cpb.GetStatusRequest(), timeout=30)


def run_once(args: argparse.Namespace, config: str) -> RunResult:
    work = Path(tempfile.mkdtemp(prefix="lepton-scale-"))
    coordinator, address = _start_coordinator(work, args, state=(config == "state"))
    clients: list[subprocess.Popen] = []
    try:
        cpu_before = _cpu_seconds(coordinator.pid)
        wall_before = time.monotonic()
        per = [
            args.workers // args.client_procs + (i < args.workers % args.client_procs) for i in range(args.client_procs)
        ]
        for i, count in enumerate(per):
            clients.append(subprocess.Popen([
                sys.executable, __file__, "--_client-out", str(work / f"client-{i}.json"), "--_address", address,
                "--workers", str(count), "--servers", str(args.servers if i == 0 else 0),
                "--seconds", str(args.seconds), "--heartbeat-interval", str(args.heartbeat_interval),
                "--progress", str(args.progress), "--progress-interval", str(args.progress_interval),
                "--lease-wait", str(args.lease_wait), "--protocol", args.protocol,
            ]))
        # The job as it stands at the end of the run, before the clients stop beating (servers
        # silent past the timeout while 1,000 clients shut down would count as dead).
        time.sleep(max(0.0, wall_before + args.seconds - 0.5 - time.monotonic()))
        cpu = _cpu_seconds(coordinator.pid) - cpu_before
        wall = time.monotonic() - wall_before
        status = _status(address)
        for client in clients:
            client.wait(timeout=args.seconds + 120)
        heartbeats: list[float] = []
        steady: list[float] = []  # sent after the first --warmup seconds (registrations, streams opening)
        calls: Counter = Counter()
        failures: Counter = Counter()
        shards = skipped = 0
        directed = 0.0
        for i in range(args.client_procs):
            part = json.loads((work / f"client-{i}.json").read_text())
            heartbeats += part["heartbeat_ms"]
            timed = zip(part["heartbeat_ms"], part["heartbeat_at"], strict=True)
            steady += [ms for ms, at in timed if at >= args.warmup]
            calls.update(part["calls"])
            failures.update(part["failures"])
            shards += part["shards_completed"]
            skipped += part["heartbeats_skipped"]
            directed = max(directed, part["directed_interval_s"])
        return RunResult(
            config=config, protocol=args.protocol, workers=args.workers, seconds=round(wall, 1),
            heartbeats=len(heartbeats),
            heartbeat_p50_ms=round(_percentile(heartbeats, 0.50), 2),
            heartbeat_p99_ms=round(_percentile(heartbeats, 0.99), 2),
            heartbeat_p99_after_warmup_ms=round(_percentile(steady, 0.99), 2),
            heartbeat_max_ms=round(max(heartbeats, default=float("nan")), 2), heartbeats_skipped=skipped,
            directed_interval_s=directed,
            calls=sum(n for name, n in calls.items() if not name.endswith(":message")), failures=dict(failures),
            shards_completed=shards, coordinator_cpu_share=round(cpu / wall, 3),
            members_declared_dead=status.members_declared_dead,
            dead_servers=sum(1 for m in status.members if m.role == common.ROLE_PARAMETER_SERVER and not m.alive),
            job_state=cpb.JobState.Name(status.state),
        )
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
        coordinator.send_signal(signal.SIGTERM)
        try:
            coordinator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            coordinator.kill()
            coordinator.wait()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _print(results: list[RunResult], args: argparse.Namespace) -> None:
    print(f"# coordinator scale: {args.workers} workers, {args.servers} servers, {args.seconds:.0f} s, "
          f"heartbeat every {args.heartbeat_interval} s (timeout {args.heartbeat_timeout} s, {args.protocol}), "
          f"{platform.node()} {os.cpu_count()} cpus")
    header = ("config", "hb p50 ms", "hb p99 ms", f"p99 after {args.warmup:g} s", "hb max ms", "heartbeats",
              "skipped", "interval s", "calls", "shards",
              "coord cpu", "dead", "state", "failures")
    print(" | ".join(header))
    for r in results:
        print(" | ".join(str(x) for x in (
            r.config, r.heartbeat_p50_ms, r.heartbeat_p99_ms, r.heartbeat_p99_after_warmup_ms, r.heartbeat_max_ms,
            r.heartbeats, r.heartbeats_skipped,
            r.directed_interval_s or args.heartbeat_interval,
            r.calls, r.shards_completed,
            f"{r.coordinator_cpu_share:.0%}", f"{r.members_declared_dead} ({r.dead_servers} ps)", r.job_state,
            ", ".join(f"{k}={v}" for k, v in sorted(r.failures.items())) or "-",
        )))
    for config in dict.fromkeys(r.config for r in results):
        rows = [r for r in results if r.config == config]
        p99 = [r.heartbeat_p99_ms for r in rows]
        print(
            f"median over {len(rows)}: {config}: hb p99 {statistics.median(p99):.1f} ms "
            f"(spread {min(p99):.1f}-{max(p99):.1f}), dead {statistics.median(r.members_declared_dead for r in rows)}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=300)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--shards", type=int, default=1000, help="shards per epoch")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5)
    parser.add_argument("--heartbeat-timeout", type=float, default=3.0)
    parser.add_argument("--lease-timeout", type=float, default=30.0)
    parser.add_argument("--progress", type=int, default=2, help="progress reports per shard")
    parser.add_argument("--progress-interval", type=float, default=0.5)
    parser.add_argument("--lease-wait", type=float, default=1.0,
                        help="LeaseShard max_wait_s (long poll; 0: the coordinator answers WAIT at once)")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--protocol", choices=("stream", "unary", "legacy"), default="stream",
                        help="stream: the worker's (HeartbeatStream, skipped and directed beats); unary: the same "
                        "with Heartbeat calls; legacy: a Heartbeat call every interval")
    parser.add_argument("--configs", default="state,memory", help="comma list of: state (SQLite state dir), memory")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory (coordinator.log)")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="also quote heartbeat p99 over the beats sent after this many seconds")
    parser.add_argument("--_client-out", dest="client_out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_address", dest="address", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_out:
        client_main(args)
        return 0
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - {"state", "memory"}
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}")
    results = [run_once(args, config) for _ in range(args.repeats) for config in configs]
    _print(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
