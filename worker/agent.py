"""The worker agent: the loop that leases shards, trains them through the parameter servers and
reports to the coordinator, recovering from fencing, stale steps and transient faults."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog
import torch

from lepton.clients import CoordinatorClient, LayoutInfo, MemberId, ParameterClient, new_request_id
from lepton.config import JobSpec
from lepton.domain import JobState, LeaseOutcome, Role, ShardLease
from lepton.errors import (
    ConfigError,
    DeadlineExceeded,
    DuplicateCompletion,
    FailedPrecondition,
    Fenced,
    InvalidArgument,
    LeptonError,
    NotFound,
    Unavailable,
)
from lepton.logs import bind
from lepton.process import EXIT_JOB_FAILED
from lepton.tensors import part, payload_bytes, rows_in, sparse_part
from lepton.retry import RetryPolicy, call_with_retry
from worker.lease import LeaseClock
from worker.progress import ProgressReporter
from worker.trainer import ShardRange, Trainer

log = structlog.get_logger("lepton.worker")
MAX_STEP_ATTEMPTS = 8
PROGRESS_INTERVAL_S = 0.2
LEASE_WAIT_S = 1.0  # a LeaseShard long poll: the coordinator answers as soon as a shard is free


JOIN_ATTEMPTS = 5  # JoinSteps rounds before a sync worker joins by pushing instead
JOIN_POLL_S = 1.0  # the longest one JoinSteps call waits (a stop is noticed between calls)


class LeaseLost(Exception):
    """The shard in hand no longer belongs to this incarnation; drop it and ask for work."""


def _observed(loss: float, samples: int) -> tuple[float, int]:
    """(loss, samples) as the coordinator accepts them: a non-finite loss (training diverged) is
    sent as no observation (samples 0), since NaN and infinities are rejected."""
    if math.isfinite(loss):
        return loss, samples
    log.warning("loss_not_finite", loss=str(loss), samples=samples)
    return 0.0, 0


class WorkerAgent:
    """Runs one worker until the job is over or ``stop`` is set (then leaves gracefully).

    Args:
        ps_client: builds a ParameterClient for an address (tests inject their own).
        step_delay_s: a test and demo hook: sleep this long before each push and before pulling
            to evaluate (a slow worker).
    """

    def __init__(
        self,
        coordinator: CoordinatorClient,
        stop: threading.Event,
        *,
        member_id: str = "",
        ps_client: Callable[[str], ParameterClient] = ParameterClient,
        retry: RetryPolicy | None = None,
        step_delay_s: float = 0.0,
    ) -> None:
        if step_delay_s < 0:
            raise ConfigError(f"the step delay must be >= 0 s (got {step_delay_s})")
        self._step_delay_s = step_delay_s
        self._requested_id = member_id
        self._coord = coordinator
        self._stop = stop
        self._ps_client = ps_client
        self._retry = retry or RetryPolicy(initial_backoff_s=0.05, max_backoff_s=2.0, max_attempts=30, max_total_s=60.0)
        self._rng = random.Random()
        self._fenced = threading.Event()
        self._job_over = threading.Event()
        self._job_state: JobState | None = None  # the last state a heartbeat reported
        self._member: MemberId | None = None
        self._spec: JobSpec | None = None
        self._trainer: Trainer | None = None
        self._layout: LayoutInfo | None = None
        self._layout_seen = 0
        self._clients: dict[str, ParameterClient] = {}
        self._versions: dict[str, int] = {}
        self._params_fresh = False
        self._participating = False
        self._pool: ThreadPoolExecutor | None = None
        self._reporter = ProgressReporter(self._send_progress, PROGRESS_INTERVAL_S)
        self._lease_clock = LeaseClock()
        self._lease_id = 0
        self.lease_pauses = 0
        self.shards_completed = 0
        self.steps = 0
        self.samples = 0
        self.stale_steps = 0
        self.join_polls = 0  # JoinSteps calls that ended before the server reached the target step
        self.registrations = 0
        self.bytes_pushed = 0
        self.bytes_pulled = 0

    # --- membership ----------------------------------------------------------------------------

    def _register(self) -> None:
        previous = self._member.member_id if self._member else self._requested_id
        self._member, spec = self._coord.register(Role.WORKER, member_id=previous)
        self.registrations += 1
        self._fenced.clear()
        self._params_fresh = False
        self._participating = False
        bind(member=self._member.member_id, incarnation=self._member.incarnation)
        log.info("worker_registered", coordinator=self._coord.address)
        if self._spec is None:
            self._spec = spec

    def _heartbeat_loop(self) -> None:
        assert self._spec is not None
        failures = 0
        # Beats on after a stop is asked for (a SIGTERM while loading data and model must not let
        # the member be declared dead before it deregisters) until run() returns.
        while not self._job_over.wait(self._spec.heartbeat_interval_s):
            member = self._member
            if member is None or self._fenced.is_set():
                continue
            sent = self._lease_clock.now()
            try:
                reply = self._coord.heartbeat(member)
                failures = 0
                if member == self._member:
                    self._lease_clock.renewed(sent)  # a heartbeat renews the member's leases
            except Fenced as exc:
                if member == self._member:
                    log.warning("worker_fenced", reason=str(exc))
                    self._fenced.set()
                continue
            except LeptonError as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("heartbeat_failed", error=str(exc), failures=failures)
                continue
            self._layout_seen = max(self._layout_seen, reply.layout_version)
            self._job_state = reply.state
            if reply.state.terminal:
                self._job_over.set()

    # --- data plane ----------------------------------------------------------------------------

    def _ensure_layout(self) -> LayoutInfo:
        if self._layout is None or self._layout_seen > self._layout.version:
            layout = self._coord.layout()
            for server in layout.servers:
                if server.address not in self._clients:
                    self._clients[server.address] = self._ps_client(server.address)
            self._layout = layout
            self._params_fresh = False
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=max(1, len(layout.servers)), thread_name_prefix="ps")
        return self._layout

    def _fan_out(self, fn: Callable) -> list:
        layout = self._ensure_layout()
        assert self._pool is not None
        futures = [self._pool.submit(fn, server) for server in layout.servers]
        return [f.result() for f in futures]

    def _pull_all(self) -> None:
        member = self._member
        assert member is not None and self._trainer is not None

        def pull(server):
            return server.member_id, self._clients[server.address].pull(member)

        for server_id, (version, tensors) in self._fan_out(pull):
            self.bytes_pulled += sum(t.numel() * t.element_size() for t in tensors.values())
            self._install(server_id, tensors)
            self._versions[server_id] = version
        self._params_fresh = True

    def _push_pull_all(self, samples: int, grads: dict[str, torch.Tensor], request_id: str) -> bool:
        """Pushes each server its share; installs the returned parameters. True if every server
        applied the push; False if any found it stale (the batch must be recomputed)."""
        member = self._member
        assert member is not None and self._trainer is not None and self._spec is not None
        timeout_s = 2 * self._spec.heartbeat_timeout_s + 10.0

        def push(server):
            # row slices are views; row-sparse gradients travel as the rows each slice holds; a
            # tensor without a gradient (or an unchanged buffer) is left out
            share = {
                t.name: sparse_part(grads[t.of], t) if t.sparse else part(grads, t)
                for t in server.tensors
                if t.of in grads
            }
            reply, version, tensors = self._clients[server.address].push_pull(
                member, self._versions.get(server.member_id, 0), samples, share,
                timeout_s=timeout_s, request_id=request_id,
            )
            rows = {n: g.indices()[0] for n, g in share.items() if g.is_sparse}  # what comes back
            return server.member_id, reply, version, tensors, rows

        all_applied = True
        self.bytes_pushed += sum(payload_bytes(g.coalesce() if g.is_sparse else g) for g in grads.values())
        for server_id, reply, version, tensors, rows in self._fan_out(push):
            self.bytes_pulled += sum(t.numel() * t.element_size() for t in tensors.values())
            self._install(server_id, tensors, rows)
            self._versions[server_id] = version
            all_applied &= reply.applied
        self._participating = self._spec.mode in ("sync", "ssp")  # others wait for it: leave when idle
        return all_applied

    def _pull_for(self, indices: torch.Tensor) -> None:
        """Before a batch of a model with sparse parameters: pulls the rows the batch reads of
        each sparse tensor and, if stale, the dense tensors, one Pull per server that has any."""
        member = self._member
        assert member is not None and self._trainer is not None
        touched = self._trainer.rows_touched(indices)
        fresh = self._params_fresh

        def pull(server):
            rows = {t.name: rows_in(t, touched[t.of]) for t in server.tensors if t.sparse}
            names = [] if fresh else [t.name for t in server.tensors if not t.sparse]
            if not names and not any(r.numel() for r in rows.values()):
                return server.member_id, None, {}, rows
            rows = {n: r for n, r in rows.items() if r.numel()}
            version, tensors = self._clients[server.address].pull(member, names, rows)
            return server.member_id, version, tensors, rows

        for server_id, version, tensors, rows in self._fan_out(pull):
            if version is None:
                continue
            self.bytes_pulled += sum(t.numel() * t.element_size() for t in tensors.values())
            self._install(server_id, tensors, rows)
            self._versions[server_id] = version
        self._params_fresh = True

    def _install(
        self, server_id: str, tensors: dict[str, torch.Tensor], rows: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Puts what a server sent into the model: whole parameters, slices into their rows, and
        selected rows of sparse tensors (``rows``: the indices within each tensor, as requested)."""
        assert self._trainer is not None and self._layout is not None
        specs = {t.name: t for s in self._layout.servers if s.member_id == server_id for t in s.tensors}
        unexpected = sorted(set(tensors) - set(specs))
        if unexpected:
            raise InvalidArgument(
                f"parameter server {server_id} sent {unexpected[:4]}, which layout "
                f"{self._layout.version} does not place there"
            )
        rows = rows or {}
        for name in [n for n in tensors if n in rows]:
            spec, values = specs[name], tensors.pop(name)
            if values.shape[0] != rows[name].numel():
                raise InvalidArgument(f"parameter server {server_id} sent {values.shape[0]} rows of {name}, not {rows[name].numel()}")
            self._trainer.set_rows(spec.of, rows[name] + spec.row_offset, values)
        self._trainer.set_parameters(tensors, specs)

    def _join_steps(self) -> None:
        """Sync: takes part from the same step on every server (JoinSteps at the highest version
        any server reports; if one has already passed it, leave everywhere and try again). Falls
        back to joining by pushing after a few refusals; errors propagate to the step's retry.

        A server answers once its version reaches the target, which can take a step's timeout.
        The worker waits in calls of at most JOIN_POLL_S (JoinSteps with the same from_version is
        safe to repeat), so that a stop (SIGTERM) is noticed within about a second: it leaves the
        steps and gives up the batch with LeaseLost, and the loop deregisters."""
        member = self._member
        assert member is not None
        layout = self._ensure_layout()
        for attempt in range(1, JOIN_ATTEMPTS + 1):
            versions = dict(self._fan_out(lambda s: (s.member_id, self._clients[s.address].server_status().version)))
            target = max(versions.values())
            # Servers whose steps agree are at most one apart (the participants push every step to
            # all of them): they are joined at the highest version. A server two or more behind
            # counts its versions from elsewhere (it restarted from a checkpoint): its step J never
            # lines up with the others', so it is joined at its own open step instead.
            targets = {sid: target if target - v <= 1 else v for sid, v in versions.items()}
            self._participating = True  # from the first call on, leaving must run on any exit
            self._params_fresh = False
            give_up = self._lease_clock.now() + self._join_timeout_s()
            answers: dict[str, tuple[bool, int]] = {}
            while len(answers) < len(layout.servers):
                if self._stop.is_set():
                    self._leave_steps()
                    raise LeaseLost  # leaving: the coordinator requeues the shard at the last offset
                remaining = give_up - self._lease_clock.now()
                if remaining <= 0:
                    # A server stays behind the target: a step there lost its last participant
                    # before anyone pushed it (one that died between its pushes to different
                    # servers), so nothing will move it. Joining by pushing moves it (the old,
                    # per-server join).
                    self._leave_steps()
                    log.warning("join_steps_timed_out_joining_by_push", from_version=target)
                    return
                timeout_s = min(JOIN_POLL_S, remaining)

                def join(server, timeout_s=timeout_s):
                    if server.member_id in answers:
                        return server.member_id, answers[server.member_id]
                    try:
                        answer = self._clients[server.address].join_steps(
                            member, targets.get(server.member_id, target), timeout_s=timeout_s
                        )
                    except DeadlineExceeded:
                        self.join_polls += 1
                        return server.member_id, None  # not there yet: ask again
                    return server.member_id, answer

                try:
                    for server_id, answer in self._fan_out(join):
                        if answer is not None:
                            answers[server_id] = answer
                except LeptonError:
                    self._leave_steps()
                    raise
                if any(not joined for joined, _ in answers.values()):
                    break  # a server was already past the target
            if len(answers) == len(layout.servers) and all(joined for joined, _ in answers.values()):
                log.info("joined_steps", from_version=target, offset={k: v for k, v in targets.items() if v != target},
                         attempt=attempt)
                return
            self._leave_steps()
            log.info("join_refused_retrying", from_version=target, versions=[v for _, v in answers.values()])
        log.warning("join_steps_gave_up", attempts=JOIN_ATTEMPTS)  # the push joins instead

    def _join_timeout_s(self) -> float:
        assert self._spec is not None
        return 2 * self._spec.heartbeat_timeout_s + 10.0

    def _leave_steps(self) -> None:
        if not self._participating or self._member is None:
            return
        member = self._member

        def leave(server):
            self._clients[server.address].leave_steps(member)

        try:
            self._fan_out(leave)
        except LeptonError as exc:
            log.warning("leave_steps_failed", error=str(exc))
        self._participating = False
        self._params_fresh = False

    def _step(self, indices: torch.Tensor) -> float:
        """Trains one batch through the servers; returns its loss.

        A push whose answer was lost (UNAVAILABLE, DEADLINE_EXCEEDED) is retried as it was, with
        the same request id, so a server that already applied it answers from memory instead of
        applying it twice. A stale step (sync) or an unknown identity re-pulls and recomputes.
        Everything is bounded by the retry policy.
        """
        assert self._trainer is not None
        attempt = 0
        pending: tuple[float, dict[str, torch.Tensor], str] | None = None
        while True:
            attempt += 1
            self._await_lease()
            try:
                if pending is None:
                    if self._spec is not None and self._spec.mode == "sync" and not self._participating:
                        self._join_steps()
                    if self._trainer.sparse:
                        self._pull_for(indices)
                    elif not self._params_fresh:
                        self._pull_all()
                    loss, grads = self._trainer.gradients(indices)
                    pending = (loss, grads, new_request_id())
                    if self._step_delay_s:
                        self._stop.wait(self._step_delay_s)  # a slow worker, on purpose (--step-delay)
                loss, grads, request_id = pending
                applied = self._push_pull_all(len(indices), grads, request_id)
                pending = None
                if applied:
                    self.steps += 1
                    self.samples += len(indices)
                    return loss
                self.stale_steps += 1
                if self._spec is not None and self._spec.mode == "sync":
                    self._participating = False  # a server dropped us from that step: join again
                log.debug("step_stale", attempt=attempt)
            except (Unavailable, DeadlineExceeded) as exc:
                if self._job_over.is_set():
                    # The job ended (failed, or cancelled) and its servers are leaving: nothing to
                    # retry against; the next lease says the job is done.
                    raise LeaseLost from exc
                if attempt >= self._retry.max_attempts:
                    raise
                delay = self._retry.backoff_s(attempt, self._rng)
                log.warning("push_retry", error=str(exc), attempt=attempt, backoff_s=round(delay, 3))
                if self._stop.wait(delay):
                    raise
            except NotFound as exc:
                # The server has not heard of this incarnation yet, or was replaced: re-pull.
                pending = None
                self._params_fresh = False
                if attempt >= self._retry.max_attempts:
                    raise
                log.warning("step_member_unknown", error=str(exc))
                self._stop.wait(self._retry.backoff_s(attempt, self._rng))
            if self._fenced.is_set():
                raise Fenced("fenced while stepping")
            if attempt >= MAX_STEP_ATTEMPTS * 4:
                raise DeadlineExceeded(f"batch failed {attempt} times")

    def _await_lease(self) -> None:
        """Pushes nothing while the lease is overdue by this worker's clock (see worker/lease.py):
        waits for a heartbeat or progress report to renew it, or for the coordinator to refuse it.
        Gives up with Unavailable (a retryable exit) when the coordinator stays unreachable."""
        if self._lease_clock.may_work():
            return
        self.lease_pauses += 1
        log.warning("lease_overdue_pausing", lease_id=self._lease_id)
        give_up = self._lease_clock.now() + self._retry.max_total_s
        while not self._lease_clock.may_work():
            if self._fenced.is_set() or self._reporter.fenced.is_set():
                raise Fenced("fenced while the lease was overdue")
            if self._reporter.lost.is_set():
                raise FailedPrecondition("the coordinator no longer lists this lease")
            if self._stop.is_set():
                raise LeaseLost  # leaving: the coordinator requeues the shard at the last offset
            if self._lease_clock.now() > give_up:
                raise Unavailable(
                    f"could not renew lease {self._lease_id} for {self._retry.max_total_s:g}s: "
                    "the coordinator is unreachable"
                )
            self._stop.wait(0.05)
        log.info("lease_renewed_resuming", lease_id=self._lease_id)

    def _train(self, lease: ShardLease) -> None:
        assert self._trainer is not None and self._member is not None
        member = self._member
        shard = ShardRange(lease.epoch, lease.shard, lease.start, lease.end, lease.offset)
        reporter = self._reporter
        reporter.begin(shard.epoch, shard.shard, shard.offset)
        log.info("shard_started", epoch=shard.epoch, shard=shard.shard, offset=shard.offset)
        try:
            for offset_after, indices in self._trainer.batches(shard):
                if self._stop.is_set() or self._fenced.is_set():
                    reporter.flush()
                    return
                if reporter.fenced.is_set():
                    raise Fenced("fenced while reporting progress")
                if reporter.lost.is_set():
                    raise FailedPrecondition("the coordinator no longer lists this lease")
                loss = self._step(indices)
                reporter.update(offset_after, loss, len(indices))
            loss, samples = reporter.end()
            self._complete(member, shard, loss, samples)
            self.shards_completed += 1
            log.info("shard_completed", epoch=shard.epoch, shard=shard.shard)
        except LeaseLost:
            if self._stop.is_set():
                reporter.flush()  # leaving mid-batch: the shard is requeued at the newest offset
            reporter.end()
            raise
        except Fenced:
            reporter.end()
            self._fenced.set()
            raise LeaseLost from None
        except (FailedPrecondition, NotFound) as exc:
            reporter.end()
            log.warning("lease_lost", epoch=shard.epoch, shard=shard.shard, reason=str(exc))
            raise LeaseLost from exc

    def _complete(self, member: MemberId, shard: ShardRange, loss: float, samples: int) -> None:
        """Completes with retries: the coordinator may be restarting. A retry that finds the shard
        already complete means an earlier attempt landed (its answer was lost)."""
        attempts = 0

        def once() -> bool:
            nonlocal attempts
            attempts += 1
            return self._coord.complete(member, shard.epoch, shard.shard, *_observed(loss, samples), lease_id=self._lease_id)

        try:
            call_with_retry(once, self._retry, rng=self._rng)
        except DuplicateCompletion:
            if attempts == 1:
                log.warning("completion_duplicate", epoch=shard.epoch, shard=shard.shard)

    def _send_progress(self, epoch: int, shard: int, offset: int, loss: float, samples: int) -> None:
        member = self._member
        if member is None:
            return
        sent = self._lease_clock.now()
        self._coord.progress_once(member, epoch, shard, offset, *_observed(loss, samples), lease_id=self._lease_id)
        self._lease_clock.renewed(sent)

    def _evaluate(self) -> None:
        assert self._trainer is not None and self._member is not None
        self._leave_steps()
        if self._step_delay_s and self._stop.wait(self._step_delay_s):  # slow to evaluate too (--step-delay)
            raise LeaseLost  # leaving: another worker (or this one's successor) evaluates
        self._pull_for_evaluation()
        result = self._trainer.evaluate()
        self._coord.report_evaluation(self._member, result)
        log.info("evaluation_reported", task=result.task, accuracy=result.accuracy, r2=result.r2, loss=round(result.loss, 4))

    def _pull_for_evaluation(self) -> None:
        """Pulls every server's parameters, following layout changes as training does: a server
        that restarts meanwhile (UNAVAILABLE at its old address, or, back at its new one, not yet
        loaded or not yet told of this worker) is retried with backoff, the layout re-read once a
        heartbeat reports it changed. Bounded by the retry policy; a fence or the job's end stops it."""
        attempt = 0
        while True:
            attempt += 1
            try:
                self._pull_all()
                return
            except (Unavailable, DeadlineExceeded, NotFound, FailedPrecondition) as exc:
                if self._job_over.is_set():
                    raise LeaseLost from exc  # the job ended meanwhile: the next lease says so
                if attempt >= self._retry.max_attempts:
                    raise
                delay = self._retry.backoff_s(attempt, self._rng)
                log.warning("evaluation_pull_retry", error=str(exc), attempt=attempt, backoff_s=round(delay, 3))
                if self._stop.wait(delay):
                    raise LeaseLost from exc
            if self._fenced.is_set():
                raise Fenced("fenced while pulling to evaluate")

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Returns 0 when the job succeeded or after a graceful leave, EXIT_JOB_FAILED when the job
        ended in FAILED."""
        self._register()
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        try:
            # Built after the heartbeat starts: loading data and model can outlast the timeout.
            self._trainer = Trainer(self._spec)  # type: ignore[arg-type]
            return self._loop()
        finally:
            self._job_over.set()
            self._reporter.close()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            for client in self._clients.values():
                client.close()

    def _loop(self) -> int:
        while True:
            if self._stop.is_set():
                self._leave()
                return 0
            if self._fenced.is_set():
                log.info("worker_reregistering")
                self._register()
            sent = self._lease_clock.now()
            try:
                decision = self._coord.lease(self._member, LEASE_WAIT_S)  # type: ignore[arg-type]
            except Fenced:
                self._fenced.set()
                continue
            if decision.outcome is LeaseOutcome.GRANTED:
                assert self._spec is not None
                assert decision.lease is not None
                self._lease_id = decision.lease.lease_id
                self._lease_clock.grant(sent, decision.lease_timeout_s or self._spec.lease_timeout_s)
                try:
                    self._ensure_layout()
                    self._train(decision.lease)
                except LeaseLost:
                    self._leave_steps()
                    continue
                finally:
                    self._lease_clock.release()
            elif decision.outcome is LeaseOutcome.EVALUATE:
                try:
                    self._evaluate()
                except (Fenced, FailedPrecondition) as exc:
                    log.warning("evaluation_rejected", reason=str(exc))
                except LeaseLost:
                    continue  # stopping, or the job is over: the loop's next turn says which
            elif decision.outcome is LeaseOutcome.JOB_DONE:
                failed = self._final_state() is JobState.FAILED
                log.info("job_done", shards_completed=self.shards_completed, steps=self.steps, failed=failed)
                return EXIT_JOB_FAILED if failed else 0
            else:
                self._leave_steps()
                self._stop.wait(max(decision.retry_after_s, 0.05))

    def _final_state(self) -> JobState | None:
        """The job's terminal state: asked once more (the last heartbeat may predate the end),
        else the last one a heartbeat reported."""
        if self._member is not None and not self._fenced.is_set():
            try:
                self._job_state = self._coord.heartbeat(self._member).state
            except LeptonError as exc:
                log.warning("final_state_unknown", error=str(exc))
        return self._job_state

    def _leave(self) -> None:
        """Graceful exit: progress was reported by _train; hand the lease back and deregister."""
        self._leave_steps()
        if self._member is None or self._fenced.is_set():
            return
        try:
            moved = self._coord.deregister(self._member)
            log.info("worker_departed", shards_requeued=moved)
        except LeptonError as exc:
            log.warning("deregister_failed", error=str(exc))
