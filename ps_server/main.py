"""Composition root of ``lepton ps``: serve, register, load the assignment, heartbeat, stop."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import structlog

from lepton import files
from lepton.clients import AssignmentInfo, CoordinatorClient
from lepton.domain import CheckpointReport, HeartbeatReply, JobState, MemberId, Role
from lepton.errors import ConfigError, FailedPrecondition, Fenced, LeptonError
from lepton.logs import bind
from lepton.process import (
    EXIT_JOB_FAILED,
    EXIT_LOST_CONTACT,
    EXIT_OK,
    ServiceOptions,
    run_every,
    write_ready_file,
)
from lepton.retry import RetryPolicy
from lepton.rpc import Server
from lepton.status import FINAL_STATUS_FILE, to_plain
from ps_server.checkpoint import CheckpointDirectory
from ps_server.metrics import ParameterServerCollector
from ps_server.node import NodeStatus, ParameterServerNode
from ps_server.rejoin import AfterFence, after_fence, keeps_state
from ps_server.roster import WorkerEntry
from ps_server.servicer import ParameterServerServicer, encode_status, registration

log = structlog.get_logger("lepton.ps")
CHECKPOINT_DIR = "checkpoints"  # under --state-dir


def write_final_status(path: Path, status: NodeStatus) -> None:
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
    if state_dir:
        # Before registering: a server that cannot keep checkpoints must not join the job it
        # would fail later (ConfigError: exit 2 naming the path).
        files.check_state_dir(files.check_state_dir(state_dir) / CHECKPOINT_DIR)
        (Path(state_dir) / FINAL_STATUS_FILE).unlink(missing_ok=True)
    client = CoordinatorClient(coordinator, retry=REGISTER_RETRY, security=options.security)
    member_box: list[MemberId] = []

    # The roster version this server has applied; heartbeats acknowledge it to the coordinator,
    # which hands out a dead worker's shards only after every server has acknowledged its fencing.
    applied_roster = [0]

    def refresh() -> list[WorkerEntry]:
        reply = client.heartbeat(member_box[0], roster_version=applied_roster[0])
        applied_roster[0] = max(applied_roster[0], reply.roster_version)  # applied by the caller now
        return [WorkerEntry(w.member_id, w.incarnation, w.alive) for w in reply.workers]

    node = ParameterServerNode(refresh_roster=refresh)
    registry, metrics = options.metrics(lambda: ParameterServerCollector(node))
    server = Server(
        listen,
        [registration(ParameterServerServicer(node))],
        security=options.security,
        registry=registry,
        reflection_enabled=options.reflection,
        limits=options.limits,
    )
    server.start()
    metrics_address = metrics.address if metrics else None
    address = advertise or server.address
    try:
        member, spec = client.register(Role.PARAMETER_SERVER, address, member_id)
    except LeptonError as exc:
        log.error("registration_failed", coordinator=coordinator, error=str(exc))
        server.stop(0)
        if metrics is not None:
            metrics.close()
        return EXIT_LOST_CONTACT
    member_box.append(member)
    del member  # the identity lives in member_box: a fenced server re-registers under a new incarnation
    node.member_id = member_box[0].member_id
    bind(member=member_box[0].member_id, incarnation=member_box[0].incarnation)
    log.info("ps_registered", address=address, coordinator=coordinator, tls=server.tls, metrics=metrics_address)
    write_ready_file(
        ready_file, address=server.address, member_id=member_box[0].member_id, metrics=metrics_address
    )
    outcome = {"code": EXIT_OK}
    # The answer to the coordinator's standing checkpoint order, sent with every heartbeat until
    # the order goes away.
    snapshot: list[CheckpointReport | None] = [None]

    def send_heartbeat() -> HeartbeatReply:
        gate = node.gate_or_none()
        version = gate.version if gate is not None else 0
        return client.heartbeat(member_box[0], version, applied_roster[0], snapshot[0])

    def answer_order(reply: HeartbeatReply) -> None:
        order = reply.checkpoint
        answer = node.answer_checkpoint(order.checkpoint_id, order.target_version) if order is not None else None
        if answer is not None and answer is not snapshot[0]:
            log.info("checkpoint_written", checkpoint=answer.checkpoint_id, version=answer.version,
                     path=answer.path, missed=answer.missed, error=answer.error)
        snapshot[0] = answer

    failure_reported = threading.Event()

    def report_failure() -> None:
        # The optimizer raised: every later push is refused, so the job cannot progress; fail it
        # now with the reason rather than let workers retry until a timeout.
        reason = node.failure
        if not reason or failure_reported.is_set():
            return
        try:
            client.report_failure(member_box[0], reason)
        except LeptonError as exc:
            log.warning("failure_report_failed", reason=reason, error=str(exc))
            return
        failure_reported.set()
        log.error("ps_failed", reason=reason)

    def load(assignment: AssignmentInfo) -> int:
        return node.load(
            assignment.tensors,
            assignment.optimizer,
            assignment.lr,
            assignment.optimizer_kwargs,
            assignment.mode,
            step_timeout_s=spec.heartbeat_timeout_s,
            checkpoints=CheckpointDirectory(Path(state_dir) / CHECKPOINT_DIR) if state_dir else None,
            checkpoint_every_steps=spec.checkpoint_every_steps,
            sparse=assignment.sparse,
            kinds=assignment.kinds,
            lr_schedule=spec.lr_schedule,
            lr_schedule_kwargs=spec.lr_schedule_kwargs,
            staleness=spec.staleness,
            async_lr_scaling=spec.async_lr_scaling,
        )

    joined = threading.Event()  # the first assignment is loaded and reported ready
    rejoining = threading.Event()  # re-registered after a fence; not yet reported ready again
    join_lock = threading.Lock()

    def reclaim(fenced: MemberId, reason: str) -> bool:
        """Takes the id back under a new incarnation after ``fenced`` was fenced while this process
        lived (a paused coordinator, a partition): no outside supervisor has to restart it. False
        when a newer incarnation holds the id (another process replaced this one): step aside."""
        with join_lock:
            if member_box[0] != fenced:
                return True  # the other thread already re-registered
            known = [(m.member_id, m.incarnation) for m in client.members()]
            if after_fence(fenced.member_id, fenced.incarnation, known) is AfterFence.STEP_ASIDE:
                log.error("ps_fenced", reason=reason, decision="step_aside")
                return False
            fresh, _ = client.register(Role.PARAMETER_SERVER, address, fenced.member_id)
            member_box[0] = fresh
            if joined.is_set():
                rejoining.set()
            bind(member=fresh.member_id, incarnation=fresh.incarnation)
            log.warning("ps_reregistered", reason=reason, previous_incarnation=fenced.incarnation)
            return True

    def finish_rejoin() -> None:
        """Reports ready again, keeping the live parameters when the assignment is unchanged (the
        coordinator keeps a restarted server's tensors), else loading afresh or from the checkpoint."""
        current = member_box[0]
        assignment = client.assignment(current)
        gate = node.gate_or_none()
        kept = gate is not None and keeps_state(gate.store.specs, assignment.tensors)
        version = gate.version if kept and gate is not None else load(assignment)
        client.report_ready(current, assignment.layout_version, version)
        if member_box[0] == current:
            rejoining.clear()
        log.info("ps_rejoined", version=version, kept_state=kept, layout_version=assignment.layout_version)

    def step_aside() -> None:
        outcome["code"] = EXIT_LOST_CONTACT
        stop.set()

    def heartbeat() -> None:
        report_failure()
        if rejoining.is_set():
            try:
                finish_rejoin()
            except LeptonError as exc:  # retried on the next heartbeat; the heartbeat still goes
                log.warning("ps_rejoin_failed", error=str(exc))
        try:
            reply = send_heartbeat()
        except Fenced as exc:
            fenced = member_box[0]
            try:
                if not reclaim(fenced, str(exc)):
                    step_aside()
                    return
                if rejoining.is_set():
                    finish_rejoin()
            except LeptonError as rejoin_exc:  # retried on the next heartbeat
                log.warning("ps_rejoin_failed", error=str(rejoin_exc))
            return
        except LeptonError as exc:
            log.warning("heartbeat_failed", error=str(exc))
            return
        node.update_roster(WorkerEntry(w.member_id, w.incarnation, w.alive) for w in reply.workers)
        applied_roster[0] = max(applied_roster[0], reply.roster_version)
        answer_order(reply)
        if reply.state.terminal:
            if snapshot[0] is not None:
                # The job ended with a checkpoint order standing (the final one): report it before
                # leaving, or the manifest would miss this server's file.
                try:
                    send_heartbeat()
                except LeptonError as exc:
                    log.warning("final_checkpoint_report_failed", error=str(exc))
            log.info("job_over", state=f"JOB_STATE_{reply.state.name}")
            if reply.state is JobState.FAILED:
                outcome["code"] = EXIT_JOB_FAILED
            stop.set()

    run_every(spec.heartbeat_interval_s, stop, heartbeat, "heartbeat")
    run_every(0.05, stop, node.tick, "step-timeout")

    while not stop.is_set():
        current = member_box[0]
        try:
            assignment = client.assignment(current)
            version = load(assignment)
            client.report_ready(current, assignment.layout_version, version)
            with join_lock:
                if member_box[0] != current:
                    continue  # re-registered meanwhile: the new incarnation must report ready too
                joined.set()
        except Fenced as exc:
            try:
                if not reclaim(current, str(exc)):
                    step_aside()
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
                client.report_failure(member_box[0], reason)
            except LeptonError as report_exc:
                log.warning("failure_report_failed", reason=reason, error=str(report_exc))
            outcome["code"] = EXIT_JOB_FAILED
            stop.set()
            break
        except FailedPrecondition as exc:
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

    stop.wait()
    status = node.status()
    log.info(
        "ps_stopping",
        version=status.version,
        updates_applied=status.updates_applied,
        pushes_rejected=status.pushes_rejected,
        steps_timed_out=status.steps_timed_out,
    )
    if state_dir:
        # Its counters as they end, for `lepton up`'s report (a poll can miss the last steps: the
        # server exits on its own once the job is over).
        write_final_status(Path(state_dir) / FINAL_STATUS_FILE, status)
    server.stop(grace_s)
    client.close()
    if metrics is not None:
        metrics.close()
    return outcome["code"]
