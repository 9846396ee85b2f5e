"""Composition root of ``lepton coordinator``: builds the job and serves it until SIGTERM."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable

import structlog

from coordinator.job import Job
from coordinator.metrics import JobCollector
from coordinator.servicer import CoordinatorServicer, registration
from coordinator.statedb import SqliteJobStore
from lepton.clock import MonotonicClock
from lepton.config import JobSpec
from lepton.errors import ConfigError, StateNotSaved
from lepton.files import check_state_dir
from lepton.limits import HEARTBEAT_STREAM
from lepton.logs import bind
from lepton.optimizers import Granularity, granularity, prove_optimizer
from lepton.process import EXIT_OK, EXIT_STATE_NOT_SAVED, ServiceOptions, run_every, write_ready_file
from lepton.rpc import Server
from lepton.tasks import resolve_task
from lepton.tensors import TensorKind
from lepton.workloads import (
    build_model,
    check_loss,
    model_tensors,
    outline_workload,
    sparse_parameter_names,
    tensor_kinds,
    tied_names,
)

log = structlog.get_logger("lepton.coordinator")

# RPC threads, and RPCs in flight before RESOURCE_EXHAUSTED: a heartbeat takes microseconds and
# no job lock, so a burst of a thousand members' calls queues briefly instead of being refused.
RPC_THREADS = 64
# Beside them, a thread for every HeartbeatStream the liveness class admits (each holds one while
# open; the pool starts them as streams open).
MAX_CONCURRENT_RPCS = 4096
# Young-generation collections rarer, full ones rarer still; everything built before serving
# (the model, the data set, the job) is frozen out of every collection.
GC_THRESHOLDS = (20_000, 50, 1000)


def keep_gc_off_the_request_path() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def build_job(spec: JobSpec, state_dir: str | None = None, clock: Callable[[], float] = time.monotonic) -> Job:
    """Outlines the dataset (its size and facts: ``outline_workload``; a file-backed one reads
    metadata and a sample, not its rows) and builds the model (its initial parameters); with a state
    directory, the job is durable and resumes what the directory holds. The clock is read after
    loading, so restored members' reattach grace starts when serving is about to start."""
    granularity(spec.optimizer)  # an unknown or refused optimizer is refused before data loads
    workload, samples = outline_workload(spec.dataset, spec.seed, spec.feature_columns, spec.label_column)
    # Refuse a loss or task that cannot train this data (ConfigError: exit 2) before any member
    # loads the job; the model's output width follows the task, as the workers build it.
    task = resolve_task(spec.task, spec.loss, workload.label_dtype)
    model = build_model(spec.model, workload, spec.seed, workload.output_dim(task, spec.loss))
    check_loss(model, workload, spec.loss, task)
    sparse = sparse_parameter_names(model)
    kinds = tensor_kinds(model)
    if TensorKind.PARAMETER not in kinds.values():
        raise ConfigError(f"model {spec.model} has no trainable parameter (every one has requires_grad=False)")
    tensors = {name: t.detach() for name, t in model_tensors(model).items()}
    # The servers build this optimizer and schedule from the spec: refuse one that cannot work
    # here, before any of them loads it (ConfigError: `lepton coordinator` reports it, exits 2).
    kind = prove_optimizer(
        [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad], sparse,
        spec.optimizer, spec.lr, spec.optimizer_kwargs, spec.lr_schedule, spec.lr_schedule_kwargs, spec.warmup_steps,
    )
    if kind is Granularity.TENSOR and spec.parameter_servers > len(tensors):
        raise ConfigError(
            f"optimizer {spec.optimizer} reads whole tensors, so each of the model's {len(tensors)} tensors "
            f"lives whole on one server: {spec.parameter_servers} parameter servers would leave one "
            f"with nothing; use at most {len(tensors)}"
        )
    store = SqliteJobStore(state_dir) if state_dir else None
    return Job(
        spec, samples, tensors, store=store, now=clock(), sparse=sparse, kinds=kinds,
        tied=tied_names(model),
        # A gap of a whole heartbeat interval (at least two tick periods) means every member may have
        # had a heartbeat go unheard because of the coordinator, not of itself.
        stall_threshold_s=spec.heartbeat_interval_s,
    )  # type: ignore[arg-type]


class ExpiryLoop:
    """The periodic expiry, and the coordinator's answer to a state directory that refuses
    commits: each refused change was rolled back and its caller told to retry, so the loop logs
    the run of failures once when it starts and once when it ends; a run longer than
    ``give_up_after_s`` stops the coordinator with EXIT_STATE_NOT_SAVED (retryable) rather than
    leave the job hanging."""

    def __init__(self, job: Job, now: Callable[[], float], stop: threading.Event, give_up_after_s: float) -> None:
        self._job = job
        self._now = now
        self._stop = stop
        self._give_up_after_s = give_up_after_s
        self._failing = False
        self.exit_code = EXIT_OK

    def tick(self) -> None:
        now = self._now()
        try:
            self._job.tick(now)
        except StateNotSaved:
            pass  # rolled back; the next tick decides again
        since = self._job.saves_failing_since
        if since is None:
            if self._failing:
                log.info("state_saved_again", failures=self._job.saves_failed)
            self._failing = False
            return
        if not self._failing:
            log.warning("state_not_saved", failures=self._job.saves_failed, give_up_after_s=self._give_up_after_s)
            self._failing = True
        if now - since > self._give_up_after_s and self.exit_code == EXIT_OK:
            log.error("state_not_saved_giving_up", failing_for_s=round(now - since, 1), failures=self._job.saves_failed)
            self.exit_code = EXIT_STATE_NOT_SAVED
            self._stop.set()


def serve(
    spec: JobSpec,
    listen: str,
    stop: threading.Event,
    *,
    ready_file: str | None = None,
    grace_s: float = 2.0,
    options: ServiceOptions = ServiceOptions(),
    state_dir: str | None = None,
) -> int:
    bind(member="coordinator")  # every line names its member; the coordinator is not one of the job's
    if state_dir:
        check_state_dir(state_dir)  # before the data loads: a bad path is refused in a second
    clock = MonotonicClock()
    job = build_job(spec, state_dir, clock.now)
    if job.restored:
        log.info("coordinator_restored", state=job.state.name, state_dir=state_dir)
    registry, metrics = options.metrics(lambda: JobCollector(job, clock.now))
    keep_gc_off_the_request_path()
    server = Server(
        listen,
        [registration(CoordinatorServicer(job, clock.now))],
        max_workers=RPC_THREADS + options.limits.of(HEARTBEAT_STREAM).limit,
        max_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        security=options.security,
        registry=registry,
        reflection_enabled=options.reflection,
        limits=options.limits,
    )
    server.start()
    metrics_address = metrics.address if metrics else None
    log.info(
        "coordinator_serving", address=server.address, tls=server.tls, metrics=metrics_address,
        mode=spec.mode, dataset=spec.dataset,
    )
    write_ready_file(ready_file, address=server.address, metrics=metrics_address)
    expiry = ExpiryLoop(job, clock.now, stop, give_up_after_s=max(30.0, 10 * spec.heartbeat_timeout_s))
    run_every(job.tick_interval_s, stop, expiry.tick, "expiry")
    stop.wait()
    log.info("coordinator_stopping", state=job.state.name)
    job.events.close()
    server.stop(grace_s)
    if metrics is not None:
        metrics.close()
    return expiry.exit_code
