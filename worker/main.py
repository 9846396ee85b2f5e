"""Composition root of ``lepton worker``."""

from __future__ import annotations

import threading

import structlog

from lepton.clients import CoordinatorClient
from lepton.errors import ConfigError, LeptonError
from lepton.process import EXIT_CONFIG, EXIT_LOST_CONTACT
from lepton.retry import RetryPolicy
from worker.agent import WorkerAgent

log = structlog.get_logger("lepton.worker")
REGISTER_RETRY = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=2.0, max_attempts=60, max_total_s=60.0)


def serve(coordinator: str, stop: threading.Event, member_id: str = "") -> int:
    client = CoordinatorClient(coordinator, retry=REGISTER_RETRY)
    try:
        return WorkerAgent(client, stop, member_id=member_id).run()
    except ConfigError as exc:
        log.error("worker_config_error", error=str(exc))
        return EXIT_CONFIG
    except LeptonError as exc:
        log.error("worker_lost_contact", error=str(exc), kind=type(exc).__name__)
        return EXIT_LOST_CONTACT
    finally:
        client.close()
