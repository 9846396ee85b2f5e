"""Composition root of ``lepton worker``."""

from __future__ import annotations

import threading
from functools import partial

import structlog

from lepton.clients import CoordinatorClient, ParameterClient
from lepton.errors import ConfigError, LeptonError
from lepton.process import EXIT_LOST_CONTACT, ServiceOptions, write_ready_file
from lepton.retry import RetryPolicy
from worker.agent import WorkerAgent
from worker.device import check_precision, resolve_device
from worker.metrics import WorkerCollector
from worker.trainer import LoaderOptions

log = structlog.get_logger("lepton.worker")
REGISTER_RETRY = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=2.0, max_attempts=60, max_total_s=60.0)


def serve(
    coordinator: str,
    stop: threading.Event,
    member_id: str = "",
    *,
    ready_file: str | None = None,
    options: ServiceOptions = ServiceOptions(),
    step_delay_s: float = 0.0,
    loader: LoaderOptions = LoaderOptions(),
    device: str | None = None,
    precision: str | None = None,
    overlap: bool = True,
) -> int:
    """Runs a worker until the job ends. ``device`` and ``precision`` override the job's; a device
    this machine lacks (or a precision it cannot run) is refused before registering (ConfigError)."""
    if device is not None:
        check_precision(precision or "fp32", resolve_device(device))
    client = CoordinatorClient(coordinator, retry=REGISTER_RETRY, security=options.security)
    agent = WorkerAgent(
        client, stop, member_id=member_id, ps_client=partial(
            ParameterClient, security=options.security, shared_memory=options.shared_memory
        ),
        step_delay_s=step_delay_s, loader=loader, device=device, precision=precision, overlap=overlap,
    )
    _, metrics = options.metrics(lambda: WorkerCollector(agent))
    write_ready_file(ready_file, metrics=metrics.address if metrics else None)
    if metrics is not None:
        log.info("worker_metrics", metrics=metrics.address)
    try:
        return agent.run()
    except ConfigError as exc:
        log.error("worker_config_error", error=str(exc))
        raise  # `lepton worker` prints the reason and exits EXIT_CONFIG
    except LeptonError as exc:
        log.error("worker_lost_contact", error=str(exc), kind=type(exc).__name__)
        return EXIT_LOST_CONTACT
    finally:
        client.close()
        if metrics is not None:
            metrics.close()
