"""A worker's evaluation: pulling the servers' whole model (retried across server restarts) and
reporting what it scores, or that it diverged."""

from __future__ import annotations

import random
import threading

import structlog

from lepton.clients import CoordinatorClient, MemberId
from lepton.errors import DeadlineExceeded, FailedPrecondition, Fenced, NotFound, Unavailable
from lepton.retry import RetryPolicy
from worker.dataplane import ServerSet
from worker.lease import LeaseLost
from worker.trainer import Trainer, divergence

log = structlog.get_logger("lepton.worker")


def evaluate_and_report(coord: CoordinatorClient, member: MemberId, trainer: Trainer, servers: ServerSet) -> None:
    """Evaluates the pulled model and reports the result; a model that diverged (a NaN or
    infinite loss, which the coordinator refuses as a result) ends the job as FAILED instead."""
    result = trainer.evaluate()
    diverged = divergence(result)
    if diverged is not None:
        log.error("model_diverged", reason=diverged)
        try:
            coord.report_failure(member, diverged)
            return
        except FailedPrecondition as exc:
            # No longer the evaluator, or a coordinator that takes failures from servers only:
            # the evaluation itself is then refused as before (FAILED_PRECONDITION, or
            # INVALID_ARGUMENT for its loss).
            log.warning("failure_report_refused", reason=str(exc))
    coord.report_evaluation(member, result, max(servers.versions.values(), default=0))
    log.info(
        "evaluation_reported", task=result.task, accuracy=result.accuracy, r2=result.r2, loss=round(result.loss, 4)
    )


def pull_for_evaluation(
    servers: ServerSet,
    retry: RetryPolicy,
    rng: random.Random,
    stop: threading.Event,
    fenced: threading.Event,
    job_over: threading.Event,
) -> None:
    """Pulls every server's parameters, following layout changes as training does: a server
    that restarts meanwhile (UNAVAILABLE at its old address, or, back at its new one, not yet
    loaded or not yet told of this worker) is retried with backoff, the layout re-read once a
    heartbeat reports it changed. Bounded by the retry policy; a fence or the job's end stops it."""
    attempt = 0
    while True:
        attempt += 1
        try:
            servers.pull_all()
            return
        except (Unavailable, DeadlineExceeded, NotFound, FailedPrecondition) as exc:
            if job_over.is_set():
                raise LeaseLost from exc  # the job ended meanwhile: the next lease says so
            if attempt >= retry.max_attempts:
                raise
            delay = retry.backoff_s(attempt, rng)
            log.warning("evaluation_pull_retry", error=str(exc), attempt=attempt, backoff_s=round(delay, 3))
            if stop.wait(delay):
                raise LeaseLost from exc
        if fenced.is_set():
            raise Fenced("fenced while pulling to evaluate")
