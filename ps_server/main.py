"""Composition root of ``lepton ps``: serve, register, run the agent, stop."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import structlog

from lepton import files, shm
from lepton.clients import CoordinatorClient
from lepton.errors import LeptonError
from lepton.process import EXIT_LOST_CONTACT, ServiceOptions, write_ready_file
from lepton.retry import RetryPolicy
from lepton.rpc import Server
from lepton.status import FINAL_STATUS_FILE, to_plain
from ps_server.agent import ParameterServerAgent
from ps_server.early import warm_optimizer
from ps_server.metrics import ParameterServerCollector
from ps_server.parameter_server import ServerStatus
from ps_server.servicer import ParameterServerServicer, encode_status, registration
from ps_server.shm_sessions import SharedMemorySessions

log = structlog.get_logger("lepton.ps")
CHECKPOINT_DIR = "checkpoints"  # under --state-dir


def write_final_status(path: Path, status: ServerStatus) -> None:
    """See FINAL_STATUS_FILE."""
    data = json.dumps(to_plain(encode_status(status)), indent=2).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomically(path, lambda f: f.write(data))
    except OSError as exc:  # the report loses the final counters, nothing else
        log.warning("final_status_not_written", path=str(path), error=str(exc))


REGISTER_RETRY = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=2.0, max_attempts=60, max_total_s=60.0)


def serve(
    coordinator: str,
    listen: str,
    stop: threading.Event,
    *,
    advertise: str = "",
    member_id: str = "",
    ready_file: str | None = None,
    grace_s: float = 2.0,
    options: ServiceOptions = ServiceOptions(),
    state_dir: str | None = None,
) -> int:
    warm_optimizer()
    if state_dir:
        # Before registering: a server that cannot keep checkpoints must not join the job it
        # would fail later (ConfigError: exit 2 naming the path).
        files.check_state_dir(files.check_state_dir(state_dir) / CHECKPOINT_DIR)
        (Path(state_dir) / FINAL_STATUS_FILE).unlink(missing_ok=True)
    client = CoordinatorClient(coordinator, retry=REGISTER_RETRY, security=options.security)
    agent = ParameterServerAgent(
        client, stop, member_id=member_id, checkpoints=Path(state_dir) / CHECKPOINT_DIR if state_dir else None
    )
    registry, metrics = options.metrics(lambda: ParameterServerCollector(agent.server))
    swept = shm.sweep()  # segments of servers that were killed before they could remove them
    if swept:
        log.info("shm_segments_swept", segments=len(swept))
    shared = SharedMemorySessions(agent.server, enabled=options.shared_memory)
    server = Server(
        listen,
        [registration(ParameterServerServicer(agent.server, shared))],
        security=options.security,
        registry=registry,
        reflection_enabled=options.reflection,
        limits=options.limits,
    )
    server.start()
    metrics_address = metrics.address if metrics else None
    address = advertise or server.address
    try:
        try:
            member = agent.register(address)
        except LeptonError as exc:
            log.error("registration_failed", coordinator=coordinator, error=str(exc))
            server.stop(0)
            return EXIT_LOST_CONTACT
        log.info(
            "ps_registered", address=address, coordinator=coordinator, tls=server.tls, metrics=metrics_address
        )
        write_ready_file(
            ready_file, address=server.address, member_id=member.member_id, metrics=metrics_address
        )
        code = agent.run()
        # The periodic checkpoint being written completes (bounded) and no other begins, so a
        # stopped server leaves the newest one it started.
        agent.server.close()
        if state_dir:
            # Its counters as they end, for `lepton up`'s report (a poll can miss the last steps:
            # the server exits on its own once the job is over).
            write_final_status(Path(state_dir) / FINAL_STATUS_FILE, agent.server.status())
        server.stop(grace_s)
        return code
    finally:
        shared.close_all()
        agent.server.close()
        client.close()
        if metrics is not None:
            metrics.close()
