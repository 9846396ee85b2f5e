"""What ``lepton up`` runs: the job, how many workers, where and how; and the job as flags for its children."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lepton.config import JobSpec
from lepton.errors import ConfigError
from lepton.ops.scale import default_max_workers, worker_name


@dataclass(frozen=True)
class Cluster:
    """What ``lepton up`` runs: the job, how many workers (now and at most), where, how.

    Raises:
        ConfigError: fewer than one worker, or ``max_workers`` below ``workers``.
    """

    spec: JobSpec
    workers: int
    coordinator_port: int = 0
    state_dir: str | None = None
    log_format: str = "auto"
    secure: bool = False
    max_workers: int | None = None  # None: max(workers, lepton.ops.scale.DEFAULT_MAX_WORKERS)
    worker_delay_s: float = 0.0  # test/demo hook: worker-0 sleeps this long before each push
    loader: Any = None  # every worker's worker.trainer.LoaderOptions (None: the defaults)
    overlap: bool = True  # False: every worker runs with --no-overlap

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1 (got {self.workers})")
        if self.max_workers is not None and self.max_workers < self.workers:
            raise ConfigError(f"--max-workers {self.max_workers} is below --workers {self.workers}")
        if self.worker_delay_s < 0:
            raise ConfigError(f"--worker-delay must be >= 0 (got {self.worker_delay_s})")

    def worker_flags(self, name: str) -> list[str]:
        """Flags for worker ``name`` beyond the common ones: data loading, and the slow-worker hook
        for worker-0 only."""
        flags = []
        if self.loader is not None:
            flags += ["--loader-workers", str(self.loader.workers), "--prefetch", str(self.loader.prefetch)]
            flags += ["--pin-memory"] if self.loader.pin_memory else []
        flags += [] if self.overlap else ["--no-overlap"]
        if self.worker_delay_s and name == worker_name(0):
            flags += ["--step-delay", repr(self.worker_delay_s)]
        return flags

    @property
    def worker_cap(self) -> int:
        return default_max_workers(self.workers) if self.max_workers is None else self.max_workers


def job_flags(spec: JobSpec) -> list[str]:
    return [
        "--dataset", spec.dataset,
        "--model", spec.model,
        "--loss", spec.loss,
        "--task", spec.task,
        "--epochs", str(spec.epochs),
        "--batch-size", str(spec.batch_size),
        "--lr", repr(spec.lr),
        "--optimizer", spec.optimizer,
        "--optimizer-kwargs", json.dumps(dict(spec.optimizer_kwargs)),
        "--lr-schedule", spec.lr_schedule, "--lr-schedule-kwargs", json.dumps(dict(spec.lr_schedule_kwargs)),
        "--staleness", str(spec.staleness),
        "--async-lr-scaling", spec.async_lr_scaling,
        "--mode", spec.mode,
        "--shards", str(spec.shards_per_epoch),
        "--seed", str(spec.seed),
        "--heartbeat-interval", repr(spec.heartbeat_interval_s),
        "--heartbeat-timeout", repr(spec.heartbeat_timeout_s),
        "--lease-timeout", repr(spec.lease_timeout_s),
        "--parameter-servers", str(spec.parameter_servers),
        "--checkpoint-every", str(spec.checkpoint_every_steps),
        "--eval-every-epochs", str(spec.eval_every_epochs),
        "--early-stopping-metric", spec.early_stopping_metric,
        "--early-stopping-patience", str(spec.early_stopping_patience),
        "--feature-columns", ",".join(spec.feature_columns),
        "--label-column", spec.label_column,
        "--device", spec.device,
        "--precision", spec.precision,
        "--clip-grad-norm", repr(spec.clip_grad_norm),
        "--warmup-steps", str(spec.warmup_steps),
        "--accumulate", str(spec.accumulate),
        "--gradient-compression", spec.gradient_compression,
        "--topk-ratio", repr(spec.topk_ratio),
    ]
