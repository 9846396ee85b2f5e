"""The worker agent: the loop that leases shards, trains them through the parameter servers and
reports to the coordinator, recovering from fencing, stale steps and transient faults."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Generator

import structlog
import torch

from lepton.clients import CoordinatorClient, MemberId, ParameterClient, new_request_id
from lepton.config import JobSpec
from lepton.domain import JobState, LeaseOutcome, Role, ShardLease
from lepton.errors import (
    ConfigError,
    DeadlineExceeded,
    DuplicateCompletion,
    FailedPrecondition,
    Fenced,
    LeptonError,
    NotFound,
    Unavailable,
)
from lepton.logs import bind
from lepton.process import EXIT_JOB_FAILED
from lepton.retry import RetryPolicy, call_with_retry
from worker.compression import ErrorFeedback
from worker.dataplane import ServerSet
from worker.evaluation import evaluate_and_report, pull_for_evaluation
from worker.heartbeat import Heartbeat
from worker.lease import LeaseClock, LeaseLost
from worker.overlap import BackwardPush, InFlight, for_trainer, prefetched
from worker.progress import ProgressReporter
from worker.sync_steps import SyncSteps
from worker.trainer import Batch, LoaderOptions, ShardRange, Trainer

log = structlog.get_logger("lepton.worker")
MAX_STEP_ATTEMPTS = 8
PROGRESS_INTERVAL_S = 0.2
LEASE_WAIT_S = 1.0  # a LeaseShard long poll: the coordinator answers as soon as a shard is free


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
        loader: how the trainer's DataLoader makes batches (``--loader-workers`` and friends).
        overlap: push each server's gradients as backward makes them and load the next batch
            while a push-pull is in flight, where that is exact (worker/overlap.py); False:
            ``--no-overlap``.
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
        loader: LoaderOptions = LoaderOptions(),
        device: str | None = None,
        precision: str | None = None,
        overlap: bool = True,
    ) -> None:
        if step_delay_s < 0:
            raise ConfigError(f"the step delay must be >= 0 s (got {step_delay_s})")
        self._step_delay_s = step_delay_s
        self._loader = loader
        self._device, self._precision = device, precision  # None: the job's
        self._requested_id = member_id
        self._coord = coordinator
        self._stop = stop
        self._ps_client = ps_client
        self._retry = retry or RetryPolicy(initial_backoff_s=0.05, max_backoff_s=2.0, max_attempts=30, max_total_s=60.0)
        self._rng = random.Random()
        self._lease_clock = LeaseClock()
        self._heartbeat = Heartbeat(coordinator, lambda: self._member, self._lease_clock)
        self._fenced = self._heartbeat.fenced
        self._job_over = self._heartbeat.job_over
        self._member: MemberId | None = None
        self._spec: JobSpec | None = None
        self._trainer: Trainer | None = None
        self._servers: ServerSet | None = None  # the data path, once the model is built
        self._steps: SyncSteps | None = None
        self._overlap = overlap
        self._backward_push: BackwardPush | None = None  # pushes during backward (worker/overlap.py)
        self._reporter = ProgressReporter(
            self._send_progress, lambda: PROGRESS_INTERVAL_S * self._heartbeat.slowdown
        )
        self._lease_id = 0
        self.lease_pauses = 0
        self.shards_completed = 0
        self.steps = 0
        self.samples = 0
        self.stale_steps = 0
        self.skipped_steps = 0  # fp16 steps whose gradients overflowed: nothing pushed
        self.registrations = 0
        self.pushes = 0  # push-pulls answered (applied or stale)
        self.push_seconds = 0.0  # their total latency, seconds
        self.pushes_during_backward = 0  # server push-pulls begun from a backward hook (worker/overlap.py)

    @property
    def bytes_pushed(self) -> int:
        return self._servers.bytes_pushed if self._servers is not None else 0

    @property
    def bytes_pulled(self) -> int:
        return self._servers.bytes_pulled if self._servers is not None else 0

    @property
    def join_polls(self) -> int:
        """JoinSteps calls that ended before the server reached the target step."""
        return self._steps.join_polls if self._steps is not None else 0

    # --- membership ----------------------------------------------------------------------------

    def _register(self) -> None:
        previous = self._member.member_id if self._member else self._requested_id
        self._member, spec = self._coord.register(Role.WORKER, member_id=previous)
        self.registrations += 1
        self._fenced.clear()
        if self._servers is not None and self._steps is not None:  # a new incarnation: unknown to the servers
            self._servers.fresh = False
            self._steps.participating = False
        bind(member=self._member.member_id, incarnation=self._member.incarnation)
        log.info("worker_registered", coordinator=self._coord.address)
        if self._spec is None:
            self._spec = spec

    def _step(self, batch: Batch) -> float:
        """Trains one batch through the servers; returns its loss.

        A push whose answer was lost (UNAVAILABLE, DEADLINE_EXCEEDED) is retried as it was, with
        the same request id, so a server that already applied it answers from memory instead of
        applying it twice. A stale step (sync) or an unknown identity re-pulls and recomputes.
        Everything is bounded by the retry policy.
        """
        assert self._trainer is not None and self._servers is not None and self._steps is not None
        assert self._spec is not None
        servers, steps = self._servers, self._steps
        attempt = 0
        pending: tuple[float, dict[str, torch.Tensor], str] | None = None
        in_flight: InFlight | None = None  # pushes started during backward, not yet settled
        while True:
            attempt += 1
            self._await_lease()
            try:
                if pending is None:
                    if self._spec.mode == "sync" and not steps.participating:
                        steps.join()
                    if self._trainer.sparse:
                        servers.pull_rows(self._trainer.rows_touched(batch))
                    elif not servers.fresh:
                        servers.pull_all()
                    request_id = new_request_id()
                    loss, grads, in_flight = self._gradients(batch, request_id)
                    if grads is None:  # fp16 overflow: the loss scale falls, nothing is pushed
                        self.skipped_steps += 1
                        if self._spec.mode == "sync":
                            steps.leave()  # the step closes without this worker; the next batch joins again
                        scaler = self._trainer.scaler
                        log.info("step_skipped_overflow", loss_scale=scaler.scale if scaler else None)
                        return loss
                    pending = (loss, grads, request_id)
                    if self._step_delay_s and in_flight is None:
                        self._stop.wait(self._step_delay_s)  # a slow worker, on purpose (--step-delay)
                loss, grads, request_id = pending
                started = time.perf_counter()
                if in_flight is not None:  # a failure retries below as a plain push_pull, same id
                    settling, in_flight = in_flight, None
                    self.pushes_during_backward += len(settling.during_backward)
                    replies = settling.finish(grads)
                else:
                    replies = servers.push_pull(len(batch.indices), grads, request_id, timeout_s=self._call_timeout_s())
                self.push_seconds += time.perf_counter() - started
                self.pushes += 1
                steps.participating = self._spec.mode in ("sync", "ssp")  # others wait for it: leave when idle
                pending = None
                applied = all(reply.applied for reply in replies.values())
                if applied:
                    self.steps += 1
                    self.samples += len(batch.indices)
                    return loss
                self.stale_steps += 1
                if self._spec.mode == "sync":
                    steps.participating = False  # a server dropped us from that step: join again
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
                servers.fresh = False
                if attempt >= self._retry.max_attempts:
                    raise
                log.warning("step_member_unknown", error=str(exc))
                self._stop.wait(self._retry.backoff_s(attempt, self._rng))
            if self._fenced.is_set():
                raise Fenced("fenced while stepping")
            if attempt >= MAX_STEP_ATTEMPTS * 4:
                raise DeadlineExceeded(f"batch failed {attempt} times")

    def _gradients(
        self, batch: Batch, request_id: str
    ) -> tuple[float, dict[str, torch.Tensor] | None, InFlight | None]:
        """The batch's loss and gradients; with overlap, the pushes backward has started too (a
        slow worker's --step-delay then comes before the batch, not between backward and push)."""
        assert self._trainer is not None
        trainer, backward_push = self._trainer, self._backward_push
        if backward_push is None:
            return (*trainer.gradients(batch), None)
        if self._step_delay_s:
            self._stop.wait(self._step_delay_s)
        return backward_push.gradients(
            lambda: trainer.gradients(batch), len(batch.indices), request_id, self._call_timeout_s()
        )

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
        batches = self._batches(shard)
        try:
            for batch in batches:
                if self._stop.is_set() or self._fenced.is_set():
                    reporter.flush()
                    return
                if reporter.fenced.is_set():
                    raise Fenced("fenced while reporting progress")
                if reporter.lost.is_set():
                    raise FailedPrecondition("the coordinator no longer lists this lease")
                loss = self._step(batch)
                reporter.update(batch.offset_after, loss, len(batch.indices))
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
        finally:
            batches.close()  # stops the prefetching thread

    def _batches(self, shard: ShardRange) -> Generator[Batch, None, None]:
        """The shard's batches; with overlap on, each made on a thread while the one before trains."""
        assert self._trainer is not None
        batches = self._trainer.batches(shard)
        if not self._overlap:
            yield from batches
            return
        with prefetched(batches) as ahead:
            yield from ahead

    def _complete(self, member: MemberId, shard: ShardRange, loss: float, samples: int) -> None:
        """Completes with retries: the coordinator may be restarting. A retry that finds the shard
        already complete means an earlier attempt landed (its answer was lost)."""
        attempts = 0

        def once() -> bool:
            nonlocal attempts
            attempts += 1
            return self._coord.complete(
                member, shard.epoch, shard.shard, *_observed(loss, samples), lease_id=self._lease_id
            )

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
        """Evaluates the servers' model and reports the result (worker/evaluation.py)."""
        assert self._trainer is not None and self._member is not None and self._steps is not None
        assert self._servers is not None
        self._steps.leave()
        if self._step_delay_s and self._stop.wait(self._step_delay_s):  # slow to evaluate too (--step-delay)
            raise LeaseLost  # leaving: another worker (or this one's successor) evaluates
        pull_for_evaluation(self._servers, self._retry, self._rng, self._stop, self._fenced, self._job_over)
        evaluate_and_report(self._coord, self._member, self._trainer, self._servers)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Returns 0 when the job succeeded or after a graceful leave, EXIT_JOB_FAILED when the job
        ended in FAILED."""
        self._register()
        assert self._spec is not None
        self._heartbeat.start(self._spec.heartbeat_interval_s)
        try:
            # Built after the heartbeat starts: loading data and model can outlast the timeout.
            self._trainer = Trainer(self._spec, self._loader, self._device, self._precision)
            self._servers = ServerSet(
                self._trainer.tensors, self._coord.layout, lambda: self._member,
                connect=self._ps_client, announced=lambda: self._heartbeat.layout_seen,
                compression=ErrorFeedback.for_job(self._spec),
            )
            self._steps = SyncSteps(self._servers, self._stop, self._lease_clock.now, self._call_timeout_s())
            self._backward_push = for_trainer(self._trainer, self._servers, self._overlap)
            return self._loop()
        finally:
            self._job_over.set()
            self._reporter.close()
            if self._backward_push is not None:
                self._backward_push.close()
            if self._servers is not None:
                self._servers.close()

    def _call_timeout_s(self) -> float:
        """How long a push-pull (or a join) may wait for a sync step to close."""
        assert self._spec is not None
        return 2 * self._spec.heartbeat_timeout_s + 10.0

    def _loop(self) -> int:
        assert self._servers is not None and self._steps is not None and self._spec is not None
        servers, steps = self._servers, self._steps
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
                assert decision.lease is not None
                self._lease_id = decision.lease.lease_id
                self._lease_clock.grant(sent, decision.lease_timeout_s or self._spec.lease_timeout_s)
                try:
                    servers.ensure_layout()
                    self._train(decision.lease)
                except LeaseLost:
                    steps.leave()
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
                failed = self._heartbeat.final_state() is JobState.FAILED
                log.info(
                    "job_done", shards_completed=self.shards_completed, steps=self.steps, failed=failed,
                    pushes=self.pushes, push_seconds=round(self.push_seconds, 3),
                    pushes_during_backward=self.pushes_during_backward,
                )
                return EXIT_JOB_FAILED if failed else 0
            else:
                steps.leave()
                self._stop.wait(max(decision.retry_after_s, 0.05))

    def _leave(self) -> None:
        """Graceful exit: progress was reported by _train; hand the lease back and deregister."""
        if self._steps is not None:
            self._steps.leave()
        if self._member is None or self._fenced.is_set():
            return
        try:
            moved = self._coord.deregister(self._member)
            log.info("worker_departed", shards_requeued=moved)
        except LeptonError as exc:
            log.warning("deregister_failed", error=str(exc))
