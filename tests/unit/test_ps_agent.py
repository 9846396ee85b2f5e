"""ParameterServerAgent against a scripted coordinator: joining, rejoining after a fence, stepping
aside for a newer incarnation, and ending with the job."""

from __future__ import annotations

import threading

import torch

from lepton.clients import AssignmentInfo
from lepton.config import JobSpec
from lepton.domain import HeartbeatReply, JobState, MemberId
from lepton.errors import FailedPrecondition, Fenced, Unavailable
from lepton.process import EXIT_JOB_FAILED, EXIT_LOST_CONTACT, EXIT_OK
from ps_server.agent import ParameterServerAgent
from support import wait_until

RUN_TIMEOUT_S = 30.0


class ScriptedCoordinator:
    """Answers like the coordinator; ``fence`` makes the next heartbeat of the current incarnation
    raise Fenced, ``newer`` lists a newer incarnation of the id, ``state`` is the job's state."""

    def __init__(self) -> None:
        self.registrations: list[MemberId] = []
        self.ready: list[tuple[MemberId, int]] = []  # (member, version reported)
        self.fence = False
        self.newer = False
        self.state = JobState.TRAINING
        self.unreachable = False  # heartbeats fail with UNAVAILABLE
        self.refusing = False  # heartbeats fail with FAILED_PRECONDITION (reachable, but refused)
        self.heartbeats = 0
        self.lock = threading.Lock()

    def register(self, role, address="", member_id=""):
        with self.lock:
            member = MemberId(member_id or "ps-0", len(self.registrations) + 1)
            self.registrations.append(member)
            return member, JobSpec(heartbeat_interval_s=0.01)

    def heartbeat(self, member, version=0, roster_version=0, checkpoint=None):
        with self.lock:
            self.heartbeats += 1
            if self.unreachable:
                raise Unavailable("connection refused")
            if self.refusing:
                raise FailedPrecondition("refused")
            if self.fence and member == self.registrations[-1]:
                self.fence = False
                raise Fenced(f"{member} is fenced")
            return HeartbeatReply(self.state, 1)

    def members(self):
        latest = self.registrations[-1]
        return (MemberId(latest.member_id, latest.incarnation + 1),) if self.newer else (latest,)

    def assignment(self, member):
        return AssignmentInfo(1, {"w": torch.zeros(2)}, "sgd", 0.1, {}, "async")

    def report_ready(self, member, layout_version, version=0):
        with self.lock:
            self.ready.append((member, version))

    def report_failure(self, member, reason):
        pass


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def start(
    coordinator: ScriptedCoordinator, clock: FakeClock | None = None
) -> tuple[ParameterServerAgent, threading.Event, list[int]]:
    stop = threading.Event()
    agent = ParameterServerAgent(coordinator, stop, clock=clock or FakeClock())  # type: ignore[arg-type]
    agent.register("127.0.0.1:1")
    codes: list[int] = []
    threading.Thread(target=lambda: codes.append(agent.run()), daemon=True).start()
    return agent, stop, codes


def wait_for(predicate, what: str) -> None:
    wait_until(predicate, RUN_TIMEOUT_S, what, interval_s=0.01)


def test_a_fenced_server_takes_its_id_back_keeps_its_parameters_and_ends_with_the_job():
    coordinator = ScriptedCoordinator()
    agent, stop, codes = start(coordinator)
    wait_for(lambda: len(coordinator.ready) == 1, "the first ready report")
    gate = agent.server.gate
    coordinator.fence = True
    wait_for(lambda: len(coordinator.ready) == 2, "the ready report after the fence")
    assert [m.incarnation for m in coordinator.registrations] == [1, 2]
    assert [(m.incarnation, v) for m, v in coordinator.ready] == [(1, 0), (2, 0)]
    assert agent.server.gate is gate  # the unchanged assignment kept the live parameters
    coordinator.state = JobState.SUCCEEDED
    wait_for(lambda: codes, "the run to end")
    assert codes == [EXIT_OK] and stop.is_set()


def test_a_fenced_server_steps_aside_when_a_newer_incarnation_holds_its_id():
    coordinator = ScriptedCoordinator()
    _, stop, codes = start(coordinator)
    wait_for(lambda: len(coordinator.ready) == 1, "the first ready report")
    coordinator.newer = True
    coordinator.fence = True
    wait_for(lambda: codes, "the run to end")
    assert codes == [EXIT_LOST_CONTACT] and stop.is_set()
    assert len(coordinator.registrations) == 1


def test_a_failed_job_ends_the_run_with_the_job_failed_code():
    coordinator = ScriptedCoordinator()
    _, _, codes = start(coordinator)
    wait_for(lambda: len(coordinator.ready) == 1, "the first ready report")
    coordinator.state = JobState.FAILED
    wait_for(lambda: codes, "the run to end")
    assert codes == [EXIT_JOB_FAILED]


def test_a_server_whose_coordinator_stays_unreachable_exits_lost_contact_and_not_before():
    coordinator = ScriptedCoordinator()
    clock = FakeClock()
    _, stop, codes = start(coordinator, clock)
    wait_for(lambda: len(coordinator.ready) == 1, "the first ready report")

    def heartbeats_after(n: int) -> None:
        seen = coordinator.heartbeats
        wait_for(lambda: coordinator.heartbeats >= seen + n, f"{n} more heartbeats")

    coordinator.unreachable = True
    clock.t += 59.0  # an outage just under the limit
    heartbeats_after(3)
    coordinator.unreachable = False
    heartbeats_after(2)  # contact is back: the silence starts again from here
    coordinator.refusing = True
    clock.t += 120.0  # refused, but answering: not lost
    heartbeats_after(3)
    assert not codes and not stop.is_set()
    coordinator.refusing = False
    heartbeats_after(2)
    coordinator.unreachable = True
    heartbeats_after(1)
    assert not codes
    clock.t += 61.0
    wait_for(lambda: codes, "the run to end")
    assert codes == [EXIT_LOST_CONTACT] and stop.is_set()
