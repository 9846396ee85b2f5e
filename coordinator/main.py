"""Composition root of ``lepton coordinator``: builds the job and serves it until SIGTERM."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from coordinator.job import Job
from coordinator.servicer import CoordinatorServicer, registration
from coordinator.store import SqliteJobStore
from lepton.clock import MonotonicClock
from lepton.config import JobSpec
from lepton.optimizers import Granularity, granularity, prove_optimizer
from coordinator.metrics import JobCollector
from lepton.process import ServiceOptions, run_every, write_ready_file
from lepton.rpc import Server
from lepton.errors import ConfigError
from lepton.tasks import resolve_task
from lepton.tensors import TensorKind
from lepton.workloads import (
    build_model, check_loss, load_workload, model_tensors, sparse_parameter_names, tensor_kinds, tied_names,
)

log = structlog.get_logger("lepton.coordinator")


def build_job(spec: JobSpec, state_dir: str | None = None, clock: Callable[[], float] = time.monotonic) -> Job:
    """Loads the dataset (for its size) and the model (for its initial parameters); with a state
    directory, the job is durable and resumes what the directory holds. The clock is read after
    loading, so restored members' reattach grace starts when serving is about to start."""
    granularity(spec.optimizer)  # an unknown or refused optimizer is refused before data loads
    workload = load_workload(spec.dataset, spec.seed)
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
        spec.optimizer, spec.lr, spec.optimizer_kwargs, spec.lr_schedule, spec.lr_schedule_kwargs,
    )
    if kind is Granularity.TENSOR and spec.parameter_servers > len(tensors):
        raise ConfigError(
            f"optimizer {spec.optimizer} reads whole tensors, so each of the model's {len(tensors)} tensors "
            f"lives whole on one server: {spec.parameter_servers} parameter servers would leave one "
            f"with nothing; use at most {len(tensors)}"
        )
    store = SqliteJobStore(state_dir) if state_dir else None
    return Job(
        spec, len(workload.train), tensors, store=store, now=clock(), sparse=sparse, kinds=kinds,
        tied=tied_names(model),
        # A gap of a whole heartbeat interval (at least two tick periods) means every member may have
        # had a heartbeat go unheard because of the coordinator, not of itself.
        stall_threshold_s=spec.heartbeat_interval_s,
    )  # type: ignore[arg-type]


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
    clock = MonotonicClock()
    job = build_job(spec, state_dir, clock.now)
    if job.restored:
        log.info("coordinator_restored", state=job.state.name, state_dir=state_dir)
    registry, metrics = options.metrics(lambda: JobCollector(job, clock.now))
    server = Server(
        listen,
        [registration(CoordinatorServicer(job, clock.now))],
        security=options.security,
        registry=registry,
        reflection_enabled=options.reflection,
    )
    server.start()
    metrics_address = metrics.address if metrics else None
    log.info(
        "coordinator_serving", address=server.address, tls=server.tls, metrics=metrics_address,
        mode=spec.mode, dataset=spec.dataset,
    )
    write_ready_file(ready_file, address=server.address, metrics=metrics_address)
    run_every(job.tick_interval_s, stop, lambda: job.tick(clock.now()), "expiry")
    stop.wait()
    log.info("coordinator_stopping", state=job.state.name)
    job.events.close()
    server.stop(grace_s)
    if metrics is not None:
        metrics.close()
    return 0
