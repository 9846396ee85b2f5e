"""The parameter server agent: registers with the coordinator, loads its assignment, heartbeats
(applying the worker roster and answering checkpoint orders) and rejoins after a fence, until the
job is over or ``stop`` is set. The twin of worker/agent.py's WorkerAgent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from lepton.clients import AssignmentInfo, CoordinatorClient
from lepton.config import JobSpec
from lepton.domain import CheckpointReport, HeartbeatReply, JobState, MemberId, Role
from lepton.errors import ConfigError, DeadlineExceeded, FailedPrecondition, Fenced, LeptonError, NotReady, Unavailable
from lepton.logs import bind
from lepton.process import EXIT_JOB_FAILED, EXIT_LOST_CONTACT, EXIT_OK, run_every
from ps_server.checkpoint_files import CheckpointDirectory
from ps_server.parameter_server import ParameterServer
from ps_server.rejoin import AfterFence, after_fence, keeps_state
from ps_server.roster import WorkerEntry

log = structlog.get_logger("lepton.ps")

# A server whose coordinator stays unreachable this long exits EXIT_LOST_CONTACT instead of serving
# a job nobody coordinates; a supervisor restarts it and it rejoins (from its checkpoint, if any).
COORDINATOR_LOST_AFTER_S = 60.0


def _entries(reply: HeartbeatReply) -> list[WorkerEntry]:
    return [WorkerEntry(w.member_id, w.incarnation, w.alive) for w in reply.workers]


class ParameterServerAgent:
    """Runs one parameter server's membership of a job; ``server`` answers the workers.

    Args:
        checkpoints: the directory of this server's checkpoints (None: runs without --state-dir,
            so it neither restores nor writes any).
        coordinator_lost_after_s: unreachable for this long (UNAVAILABLE or DEADLINE_EXCEEDED on
            every heartbeat), the server stops with EXIT_LOST_CONTACT.
    """

    def __init__(
        self,
        coordinator: CoordinatorClient,
        stop: threading.Event,
        *,
        member_id: str = "",
        checkpoints: Path | None = None,
        coordinator_lost_after_s: float = COORDINATOR_LOST_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._coord = coordinator
        self._clock = clock
        self._lost_after_s = coordinator_lost_after_s
        self._last_contact = clock()
        self._stop = stop
        self._requested_id = member_id
        self._checkpoints = checkpoints
        self.server = ParameterServer(refresh_roster=self._refresh_roster)
        self._address = ""
        self._member: MemberId | None = None  # replaced when a fenced server re-registers
        self._spec: JobSpec | None = None
        # The roster version this server has applied; heartbeats acknowledge it to the coordinator,
        # which hands out a dead worker's shards only after every server has acknowledged its fencing.
        self._applied_roster = 0
        # The answer to the coordinator's standing checkpoint order, sent with every heartbeat until
        # the order goes away.
        self._checkpoint_answer: CheckpointReport | None = None
        self._exit_code = EXIT_OK
        self._failure_reported = threading.Event()
        self._joined = threading.Event()  # the first assignment is loaded and reported ready
        self._rejoining = threading.Event()  # re-registered after a fence; not yet reported ready again
        self._join_lock = threading.Lock()

    @property
    def member(self) -> MemberId:
        assert self._member is not None, "register() first"
        return self._member

    # --- membership ----------------------------------------------------------------------------

    def register(self, address: str) -> MemberId:
        """Registers this server, reachable at ``address``; raises LeptonError when the
        coordinator cannot be reached."""
        member, self._spec = self._coord.register(Role.PARAMETER_SERVER, address, self._requested_id)
        self._address = address
        self._member = member
        self.server.member_id = member.member_id
        bind(member=member.member_id, incarnation=member.incarnation)
        return member

    def _refresh_roster(self) -> list[WorkerEntry]:
        """The current workers, asked of the coordinator when a push names one not heard of yet."""
        reply = self._coord.heartbeat(self.member, roster_version=self._applied_roster)
        self._applied_roster = max(self._applied_roster, reply.roster_version)  # applied by the caller now
        return _entries(reply)

    def _reclaim(self, fenced: MemberId, reason: str) -> bool:
        """Takes the id back under a new incarnation after ``fenced`` was fenced while this process
        lived (a paused coordinator, a partition): no outside supervisor has to restart it. False
        when a newer incarnation holds the id (another process replaced this one): step aside."""
        with self._join_lock:
            if self._member != fenced:
                return True  # the other thread already re-registered
            known = [(m.member_id, m.incarnation) for m in self._coord.members()]
            if after_fence(fenced.member_id, fenced.incarnation, known) is AfterFence.STEP_ASIDE:
                log.error("ps_fenced", reason=reason, decision="step_aside")
                return False
            fresh, _ = self._coord.register(Role.PARAMETER_SERVER, self._address, fenced.member_id)
            self._member = fresh
            if self._joined.is_set():
                self._rejoining.set()
            bind(member=fresh.member_id, incarnation=fresh.incarnation)
            log.warning("ps_reregistered", reason=reason, previous_incarnation=fenced.incarnation)
            return True

    def _finish_rejoin(self) -> None:
        """Reports ready again, keeping the live parameters when the assignment is unchanged (the
        coordinator keeps a restarted server's tensors), else loading afresh or from the checkpoint."""
        current = self.member
        assignment = self._coord.assignment(current)
        gate = self.server.gate_or_none()
        kept = gate is not None and keeps_state(gate.store.specs, assignment.tensors)
        version = gate.version if kept and gate is not None else self._load(assignment)
        self._coord.report_ready(current, assignment.layout_version, version)
        if self._member == current:
            self._rejoining.clear()
        log.info("ps_rejoined", version=version, kept_state=kept, layout_version=assignment.layout_version)

    def _step_aside(self) -> None:
        self._exit_code = EXIT_LOST_CONTACT
        self._stop.set()

    def _report_failure(self) -> None:
        # The optimizer raised: every later push is refused, so the job cannot progress; fail it
        # now with the reason rather than let workers retry until a timeout.
        reason = self.server.failure
        if not reason or self._failure_reported.is_set():
            return
        try:
            self._coord.report_failure(self.member, reason)
        except LeptonError as exc:
            log.warning("failure_report_failed", reason=reason, error=str(exc))
            return
        self._failure_reported.set()
        log.error("ps_failed", reason=reason)

    # --- heartbeat -----------------------------------------------------------------------------

    def _send_heartbeat(self) -> HeartbeatReply:
        gate = self.server.gate_or_none()
        version = gate.version if gate is not None else 0
        return self._coord.heartbeat(self.member, version, self._applied_roster, self._checkpoint_answer)

    def _answer_order(self, reply: HeartbeatReply) -> None:
        order = reply.checkpoint
        answer = None
        if order is not None:
            answer = self.server.answer_checkpoint(order.checkpoint_id, order.target_version)
        if answer is not None and answer is not self._checkpoint_answer:
            log.info("checkpoint_written", checkpoint=answer.checkpoint_id, version=answer.version,
                     path=answer.path, missed=answer.missed, error=answer.error)
        self._checkpoint_answer = answer

    def _heartbeat(self) -> None:
        self._report_failure()
        if self._rejoining.is_set():
            try:
                self._finish_rejoin()
            except LeptonError as exc:  # retried on the next heartbeat; the heartbeat still goes
                log.warning("ps_rejoin_failed", error=str(exc))
        try:
            reply = self._send_heartbeat()
        except Fenced as exc:
            fenced = self.member
            try:
                if not self._reclaim(fenced, str(exc)):
                    self._step_aside()
                    return
                if self._rejoining.is_set():
                    self._finish_rejoin()
            except LeptonError as rejoin_exc:  # retried on the next heartbeat
                log.warning("ps_rejoin_failed", error=str(rejoin_exc))
            return
        except NotReady as exc:  # an answer: the coordinator is there, just not ready
            self._last_contact = self._clock()
            log.warning("heartbeat_failed", error=str(exc))
            return
        except (Unavailable, DeadlineExceeded) as exc:
            silent_s = self._clock() - self._last_contact
            log.warning("heartbeat_failed", error=str(exc), coordinator_silent_s=round(silent_s, 1))
            if silent_s > self._lost_after_s:
                log.error("coordinator_lost", silent_s=round(silent_s, 1), limit_s=self._lost_after_s)
                self._exit_code = EXIT_LOST_CONTACT
                self._stop.set()
            return
        except LeptonError as exc:
            self._last_contact = self._clock()  # it answered, if only to refuse
            log.warning("heartbeat_failed", error=str(exc))
            return
        self._last_contact = self._clock()
        self.server.update_roster(_entries(reply))
        self._applied_roster = max(self._applied_roster, reply.roster_version)
        self._answer_order(reply)
        if reply.state.terminal:
            if self._checkpoint_answer is not None:
                # The job ended with a checkpoint order standing (the final one): report it before
                # leaving, or the manifest would miss this server's file.
                try:
                    self._send_heartbeat()
                except LeptonError as exc:
                    log.warning("final_checkpoint_report_failed", error=str(exc))
            log.info("job_over", state=f"JOB_STATE_{reply.state.name}")
            if reply.state is JobState.FAILED:
                self._exit_code = EXIT_JOB_FAILED
            self._stop.set()

    # --- assignment ----------------------------------------------------------------------------

    def _load(self, assignment: AssignmentInfo) -> int:
        spec = self._spec
        assert spec is not None
        return self.server.load(
            assignment.tensors,
            assignment.optimizer,
            assignment.lr,
            assignment.optimizer_kwargs,
            assignment.mode,
            step_timeout_s=spec.heartbeat_timeout_s,
            checkpoints=CheckpointDirectory(self._checkpoints) if self._checkpoints is not None else None,
            checkpoint_every_steps=spec.checkpoint_every_steps,
            sparse=assignment.sparse,
            kinds=assignment.kinds,
            lr_schedule=spec.lr_schedule,
            lr_schedule_kwargs=spec.lr_schedule_kwargs,
            staleness=spec.staleness,
            async_lr_scaling=spec.async_lr_scaling,
            warmup_steps=spec.warmup_steps,
        )

    def _join(self) -> None:
        """Loads the assignment and reports ready, retrying until it has, the job fails or ``stop``."""
        stop = self._stop
        while not stop.is_set():
            current = self.member
            try:
                assignment = self._coord.assignment(current)
                version = self._load(assignment)
                self._coord.report_ready(current, assignment.layout_version, version)
                with self._join_lock:
                    if self._member != current:
                        continue  # re-registered meanwhile: the new incarnation must report ready too
                    self._joined.set()
            except Fenced as exc:
                try:
                    if not self._reclaim(current, str(exc)):
                        self._step_aside()
                        break
                except LeptonError as rejoin_exc:
                    log.warning("ps_rejoin_failed", error=str(rejoin_exc))
                    stop.wait(0.5)
                continue
            except ConfigError as exc:
                # The coordinator proved the optimizer on the whole model; one that still cannot be
                # built on this server's share fails the job (retrying would refuse again).
                reason = f"cannot load its assignment: {exc}"
                log.error("assignment_refused", reason=reason)
                try:
                    self._coord.report_failure(self.member, reason)
                except LeptonError as report_exc:
                    log.warning("failure_report_failed", reason=reason, error=str(report_exc))
                self._exit_code = EXIT_JOB_FAILED
                stop.set()
                break
            except NotReady as exc:  # no layout yet: the coordinator says when to ask again
                log.debug("assignment_not_ready", reason=str(exc))
                stop.wait(exc.retry_after_s if exc.retry_after_s is not None else 0.2)
                continue
            except FailedPrecondition as exc:  # e.g. the layout changed between the calls
                log.debug("assignment_not_ready", reason=str(exc))
                stop.wait(0.2)
                continue
            except LeptonError as exc:
                log.warning("assignment_failed", error=str(exc))
                stop.wait(0.5)
                continue
            log.info(
                "assignment_loaded",
                restored_version=version,
                tensors=len(assignment.tensors),
                layout_version=assignment.layout_version,
                mode=assignment.mode,
                optimizer=assignment.optimizer,
            )
            break

    # --- the whole run -------------------------------------------------------------------------

    def run(self) -> int:
        """Heartbeats, joins and serves until the job is over or ``stop`` is set; returns EXIT_OK,
        EXIT_JOB_FAILED (the job failed) or EXIT_LOST_CONTACT (another process took the id).
        ``register`` first."""
        spec = self._spec
        assert spec is not None, "register() first"
        run_every(spec.heartbeat_interval_s, self._stop, self._heartbeat, "heartbeat")
        run_every(0.05, self._stop, self.server.tick, "step-timeout")
        self._join()
        self._stop.wait()
        status = self.server.status()
        log.info(
            "ps_stopping",
            version=status.version,
            updates_applied=status.updates_applied,
            pushes_rejected=status.pushes_rejected,
            steps_timed_out=status.steps_timed_out,
        )
        return self._exit_code
