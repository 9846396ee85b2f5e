"""A parameter server's first optimizer imports ``torch._dynamo`` (torch.optim does, 1.2 s of CPU
here), so a background thread builds and steps a throwaway one from the server's start, while it
starts serving, registers and waits for its assignment."""

from __future__ import annotations

import threading

import structlog

log = structlog.get_logger("lepton.ps")


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
