"""``lepton checkpoint``: ask a running job for a coordinated checkpoint and, with ``--wait``, wait
until every server has written its file. Imports no torch."""

from __future__ import annotations

import sys
import time

from lepton.coordinator_client import CoordinatorClient
from lepton.errors import LeptonError
from lepton.process import EXIT_CONFIG, EXIT_LOST_CONTACT, exit_code_for
from lepton.security import INSECURE, Security
from lepton.v1 import coordinator_pb2 as cpb

POLL_S = 0.2


def describe(checkpoint: cpb.CheckpointManifest) -> str:
    state = cpb.CheckpointState.Name(checkpoint.state).removeprefix("CHECKPOINT_STATE_").lower()
    lines = [
        f"checkpoint {checkpoint.checkpoint_id} {state}"
        + (f" after {checkpoint.completed_after_s:.2f}s" if checkpoint.completed_after_s else "")
        + (", consistent (every server at the same step)" if checkpoint.consistent else ""),
    ]
    if checkpoint.error:
        lines.append(f"  error: {checkpoint.error}")
    for s in checkpoint.servers:
        lines.append(f"  {s.member_id:<12} version {s.version:<8} {s.path}")
    if checkpoint.manifest_path:
        lines.append(f"  manifest {checkpoint.manifest_path}")
    return "\n".join(lines)


def request_checkpoint(
    address: str, reason: str = "", wait_s: float | None = None, security: Security = INSECURE
) -> int:
    """``lepton checkpoint``: asks for one; with ``wait_s``, polls until it is complete (or failed,
    or the time is up: exit code 160). Prints its id and, once complete, where the files are."""
    client = CoordinatorClient(address, timeout_s=5.0, security=security)
    try:
        reply = client.request_checkpoint(reason)
        print(f"checkpoint {reply.checkpoint_id} {'already pending' if reply.coalesced else 'requested'}", flush=True)
        if wait_s is None:
            return 0
        deadline = time.monotonic() + wait_s
        while True:
            checkpoint = client.checkpoint(reply.checkpoint_id)
            if checkpoint.state != cpb.CHECKPOINT_STATE_PENDING:
                print(describe(checkpoint))
                return 0 if checkpoint.state == cpb.CHECKPOINT_STATE_COMPLETE else EXIT_CONFIG
            if time.monotonic() > deadline:
                print(f"lepton checkpoint: {reply.checkpoint_id} not complete after {wait_s:g}s", file=sys.stderr)
                return EXIT_LOST_CONTACT
            time.sleep(POLL_S)
    except LeptonError as exc:
        print(f"lepton checkpoint: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    finally:
        client.close()
