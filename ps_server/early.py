"""A parameter server's start before it knows its job: torch.optim's first optimizer imports
``torch._dynamo`` (1.2 s of CPU here), so a background thread builds and steps a throwaway one
while the server registers and waits for its assignment; and a server started beside its
coordinator (``lepton up``) waits for the coordinator's ready file to learn where it serves
(it warms up only then: a configuration the coordinator refuses is refused without that CPU)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import structlog

from lepton.errors import ConfigError

log = structlog.get_logger("lepton.ps")
READY_POLL_S = 0.05


def warm_optimizer() -> threading.Thread:
    """Starts (and returns) a daemon thread that builds and steps an Adam over one element."""

    def warm() -> None:
        import torch

        try:
            param = torch.nn.Parameter(torch.zeros(1))
            param.grad = torch.zeros(1)
            torch.optim.Adam([param]).step()
        except Exception as exc:  # noqa: BLE001 - only a head start; the real load reports its own errors
            log.debug("optimizer_warm_up_failed", error=str(exc))

    thread = threading.Thread(target=warm, name="optimizer-warm-up", daemon=True)
    thread.start()
    return thread


def coordinator_from_ready_file(path: Path, stop: threading.Event, timeout_s: float) -> str | None:
    """The address in the coordinator's ready file once it is written; None if ``stop`` is set
    first or the coordinator wrote a refusal instead (its launcher reports that).

    Raises:
        ConfigError: no ready file within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        try:
            facts = json.loads(path.read_text())
        except (OSError, ValueError):
            facts = None
        if isinstance(facts, dict):
            if facts.get("error"):
                return None
            if facts.get("address"):
                return str(facts["address"])
        if time.monotonic() > deadline:
            raise ConfigError(f"no coordinator ready file at {path} within {timeout_s:.0f}s")
        stop.wait(READY_POLL_S)
    return None
