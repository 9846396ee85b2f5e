"""Liveness over Coordinator.HeartbeatStream against a real coordinator process: a member that beats
only on the stream stays alive past the heartbeat timeout, a real worker stopped with SIGSTOP is
still declared dead after it, and the stream answers a fenced incarnation with Fenced."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from lepton.clients import CoordinatorClient
from lepton.domain import Role
from lepton.errors import Fenced
from support import lepton_argv, read_json, wait_until

pytestmark = pytest.mark.e2e

INTERVAL_S, TIMEOUT_S = 0.2, 1.5


def member_alive(client: CoordinatorClient, member_id: str) -> bool | None:
    """Whether the coordinator counts ``member_id`` alive (None: not listed yet)."""
    for m in client.status().members:
        if m.member.member_id == member_id:
            return m.alive
    return None


def test_a_streaming_member_lives_on_and_a_stopped_worker_is_declared_dead(processes, tmp_path):
    processes.start(
        "coordinator",
        lepton_argv(
            "coordinator", "--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "c.json"),
            "--parameter-servers", "1", "--heartbeat-interval", str(INTERVAL_S),
            "--heartbeat-timeout", str(TIMEOUT_S), "--log-format", "json",
        ),
    )
    address = wait_until(lambda: read_json(tmp_path / "c.json"), 60, "the coordinator")["address"]
    client = CoordinatorClient(address)
    beats = CoordinatorClient(address)
    stop = threading.Event()
    errors: list[BaseException] = []
    try:
        # A real worker (no parameter server: it waits for work, beating on its stream).
        worker = processes.start("worker", lepton_argv("worker", "--coordinator", address))
        worker_id = wait_until(
            lambda: next((m.member.member_id for m in client.status().members if m.role == 2), None),
            120, "the worker to register",
        )
        # A member that does nothing but beat on the stream.
        member, _ = beats.register(Role.WORKER)
        registered = time.monotonic()

        def beat() -> None:
            try:
                while not stop.wait(INTERVAL_S):
                    beats.beat(member)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: member_alive(client, worker_id) is False, 10 * TIMEOUT_S, "the stopped worker's death")
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        # Watched for three timeouts after it registered: alive throughout.
        while time.monotonic() < registered + 3 * TIMEOUT_S:
            assert member_alive(client, member.member_id) is True, errors
            time.sleep(0.1)  # the polling period of the observation, not a synchronisation
        assert not errors
        assert beats._beats.opened == 1 and not beats._beats.unimplemented  # one stream all along
        stop.set()
        thread.join(timeout=5)
        # Silent now: the streaming member dies too, after the timeout.
        wait_until(lambda: member_alive(client, member.member_id) is False, 10 * TIMEOUT_S, "the silent member's death")
        with pytest.raises(Fenced):
            beats.beat(member)
    finally:
        stop.set()
        client.close()
        beats.close()
