"""Workers leave gracefully (SIGTERM) and join mid-epoch, as real processes."""

from __future__ import annotations

import signal
import time

import pytest

from lepton.clients import CoordinatorClient
from lepton.v1 import common_pb2
from lepton.v1 import coordinator_pb2 as cpb
from support import job_events, lepton_argv, read_json, wait_until

pytestmark = pytest.mark.e2e


def test_sigterm_requeues_the_lease_at_once_and_a_joining_worker_takes_leases(processes, tmp_path):
    # A heartbeat timeout of 60 s: a requeue that came from the timeout would take a minute.
    processes.start(
        "coordinator",
        lepton_argv(
            "coordinator", "--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "c.json"),
            "--parameter-servers", "1", "--epochs", "40", "--shards", "1",
            "--heartbeat-interval", "0.5", "--heartbeat-timeout", "60",
        ),
    )
    address = wait_until(lambda: read_json(tmp_path / "c.json"), 60, "the coordinator")["address"]
    processes.start("ps", lepton_argv("ps", "--coordinator", address, "--listen", "127.0.0.1:0"))
    # A step delay of 50 ms: the digits shard (one per epoch) lasts seconds, so a lease seen in its
    # first half is still held when the signal lands (undelayed, it ends within a few hundred ms).
    leaver = processes.start("worker-a", lepton_argv("worker", "--coordinator", address, "--step-delay", "0.05"))
    client = CoordinatorClient(address)
    try:
        # Read before the lease is looked for: reading the events waits out a 1 s stream deadline,
        # which must not fall between seeing the lease and the signal.
        sequence = max((e.sequence for e in job_events(client)), default=0)

        def leaver_lease():
            for m in client.status().members:
                # One shard per epoch, picked in its first half: it cannot finish before the signal lands.
                half = (m.lease.end - m.lease.start) // 2
                if (
                    m.role == common_pb2.ROLE_WORKER
                    and m.pid == leaver.pid
                    and m.has_lease
                    and 0 < m.lease.offset < half
                ):
                    return m
            return None

        member = wait_until(leaver_lease, 120, "the worker to hold a lease with progress")
        sent = time.time()
        leaver.send_signal(signal.SIGTERM)
        assert leaver.wait(timeout=30) == 0

        def requeued():
            for event in job_events(client, sequence):
                if event.kind == cpb.EVENT_KIND_SHARD_REQUEUED and event.member.member_id == member.member.member_id:
                    return event
            return None

        event = wait_until(requeued, 20, "the shard to be requeued")
        elapsed = event.time_unix_s - sent  # the coordinator's own timestamp of the requeue
        print(f"SIGTERM to requeue: {elapsed * 1000:.0f} ms (shard {event.shard}, offset {event.offset})")
        assert elapsed < 20  # far below the 60 s heartbeat timeout: requeued by the departure
        assert event.offset > 0
        status = client.status()
        gone = next(m for m in status.members if m.member.member_id == member.member.member_id)
        assert not gone.alive and status.members_declared_dead == 0

        joiner = processes.start("worker-b", lepton_argv("worker", "--coordinator", address))

        def joiner_lease():
            for event in job_events(client, sequence):
                if event.kind == cpb.EVENT_KIND_SHARD_LEASED and event.member.member_id not in (
                    "",
                    member.member.member_id,
                ):
                    return event
            return None

        lease = wait_until(joiner_lease, 120, "the joining worker to lease a shard")
        assert (lease.epoch, lease.shard, lease.offset) == (event.epoch, event.shard, event.offset)  # resumes there
        assert joiner.poll() is None
    finally:
        client.close()

