"""Job configuration: one frozen dataclass, validated on construction, read from TOML and flags.

Every knob of a job is defined here and documented in docs/cli.md.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton.errors import ConfigError

MODES = ("async", "sync", "ssp")
# What a job learns; "auto" follows the loss, then the labels' dtype (lepton.tasks).
TASKS = ("auto", "classification", "regression")
# How an async parameter server sets the learning rate of one push from its staleness (see
# ``ps_server/staleness.py``): "staleness" scales it by min(1, max(1, W - 1) / staleness), W the
# workers pushing; "inverse" by 1 / max(1, staleness); "none" applies every push at the schedule's lr.
ASYNC_LR_SCALINGS = ("staleness", "inverse", "none")
# Metrics early stopping can watch, and whether a larger value is better.
EARLY_STOPPING_METRICS = {"loss": False, "accuracy": True, "macro_recall": True, "mse": False, "mae": False, "r2": True}
# Where a worker trains ("cuda:N" too) and the precision of its forward and backward passes.
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
# How workers compress pushed gradients, with error feedback (worker/compression.py).
GRADIENT_COMPRESSIONS = ("none", "fp16", "bf16", "topk", "sign")
DEFAULT_TOPK_RATIO = 0.01
# Learning-rate schedules the parameter servers apply, counted in server updates (versions), and
# the keyword arguments each takes: {name: (required, optional)}.
LR_SCHEDULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "constant": ((), ()),
    "step": (("step_size",), ("gamma",)),  # lr x gamma every step_size updates (gamma: 0.1)
    "cosine": (("t_max",), ("eta_min",)),  # cosine from lr to eta_min over t_max updates (eta_min: 0)
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def device_problem(device: Any) -> str | None:
    """Why ``device`` is no device name (auto, cpu, cuda, cuda:N), or None."""
    if isinstance(device, str) and (device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit())):
        return None
    return f"device must be auto, cpu, cuda or cuda:N, got {device!r}"


def precision_problem(precision: Any) -> str | None:
    """Why ``precision`` is not one of PRECISIONS, or None."""
    return None if precision in PRECISIONS else f"precision must be one of {PRECISIONS}, got {precision!r}"


def _lr_schedule_problems(schedule: str, kwargs: Any) -> list[str]:
    if schedule not in LR_SCHEDULES:
        return [f"lr_schedule must be one of {tuple(LR_SCHEDULES)}, got {schedule!r}"]
    if not isinstance(kwargs, Mapping):
        return ["lr_schedule_kwargs must be a table"]
    required, optional = LR_SCHEDULES[schedule]
    problems = []
    missing = [k for k in required if k not in kwargs]
    unknown = sorted(set(kwargs) - set(required) - set(optional))
    if missing:
        problems.append(f"lr_schedule {schedule!r} needs lr_schedule_kwargs {missing}")
    if unknown:
        problems.append(f"lr_schedule {schedule!r} takes no lr_schedule_kwargs {unknown}")
    for name in ("step_size", "t_max"):
        value = kwargs.get(name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"lr_schedule_kwargs.{name} must be an integer >= 1 (updates), got {value!r}")
    gamma, eta_min = kwargs.get("gamma", 0.1), kwargs.get("eta_min", 0.0)
    if not _is_number(gamma) or not gamma > 0:
        problems.append(f"lr_schedule_kwargs.gamma must be a number > 0, got {gamma!r}")
    if not _is_number(eta_min) or not eta_min >= 0:
        problems.append(f"lr_schedule_kwargs.eta_min must be a number >= 0, got {eta_min!r}")
    return problems


@dataclass(frozen=True)
class JobSpec:
    """What a training job is: data, model, optimizer, schedule and failure timing.

    Raises:
        ConfigError: from ``__post_init__`` when a value is out of range.
    """

    dataset: str = "digits"
    model: str = "mlp"
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 0.01
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mode: str = "async"
    shards_per_epoch: int = 12
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 3.0
    parameter_servers: int = 2
    seed: int = 0
    checkpoint_every_steps: int = 25
    # The parameter servers' learning-rate schedule, stepped once per applied update (version).
    lr_schedule: str = "constant"
    lr_schedule_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # ssp: how many pushes a worker may be ahead of the slowest one (0: lockstep).
    staleness: int = 0
    # A shard lease not renewed (by its holder's heartbeats or progress) for this long is revoked.
    lease_timeout_s: float = 10.0
    # The training loss: a built-in name (lepton.tasks.BUILTIN_LOSSES) or package.module:factory.
    loss: str = "cross_entropy"
    # "auto", "classification" or "regression": which metrics evaluation reports (lepton.tasks).
    task: str = "auto"
    # async: the learning rate of a push staler than the steady state is scaled down (ASYNC_LR_SCALINGS).
    async_lr_scaling: str = "staleness"
    # Validate on the test split after every this many epochs (0: only the final evaluation).
    eval_every_epochs: int = 0
    # Early stopping: end training once this metric (EARLY_STOPPING_METRICS; "": never) has not
    # improved on its best for early_stopping_patience validations in a row.
    early_stopping_metric: str = ""
    early_stopping_patience: int = 3
    # parquet:DIR and npy:DIR data sets: the feature columns (empty: all but the label) and the label's.
    feature_columns: tuple[str, ...] = ()
    label_column: str = "label"
    # Where workers train and at what precision; `lepton worker --device/--precision` override them.
    device: str = "auto"
    precision: str = "fp32"
    # A worker clips its whole-model gradient to this global L2 norm before pushing (0: no clipping).
    clip_grad_norm: float = 0.0
    # Linear lr warmup over this many server updates, multiplied into lr_schedule (0: none).
    warmup_steps: int = 0
    # Batches of batch_size whose mean-loss gradient one push carries (gradient accumulation).
    accumulate: int = 1
    # Pushed gradients compressed on the wire with error feedback (GRADIENT_COMPRESSIONS), and the
    # fraction of each tensor's elements "topk" sends.
    gradient_compression: str = "none"
    topk_ratio: float = DEFAULT_TOPK_RATIO

    def __post_init__(self) -> None:
        problems = []
        counts = (
            "epochs", "batch_size", "shards_per_epoch", "parameter_servers", "seed", "checkpoint_every_steps",
            "eval_every_epochs", "early_stopping_patience",
            "warmup_steps", "accumulate",
        )
        for name in (*counts, "staleness"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"invalid job: {name} must be an integer, got {value!r}")
        numbers = (
            "lr", "heartbeat_interval_s", "heartbeat_timeout_s", "lease_timeout_s", "clip_grad_norm", "topk_ratio",
        )
        for name in numbers:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"invalid job: {name} must be a number, got {value!r}")
        if not self.dataset:
            problems.append("dataset must be named")
        if not self.model:
            problems.append("model must be named")
        if not self.loss:
            problems.append("loss must be named")
        if self.task not in TASKS:
            problems.append(f"task must be one of {TASKS}, got {self.task!r}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not (0 < self.lr < float("inf")):
            problems.append(f"lr must be a finite number > 0, got {self.lr}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.shards_per_epoch < 1:
            problems.append(f"shards_per_epoch must be >= 1, got {self.shards_per_epoch}")
        if not (self.heartbeat_interval_s > 0):
            problems.append(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if not (self.heartbeat_timeout_s > 2 * self.heartbeat_interval_s):
            problems.append(
                "heartbeat_timeout_s must exceed twice heartbeat_interval_s "
                f"({self.heartbeat_timeout_s} <= 2 x {self.heartbeat_interval_s})"
            )
        if not (self.lease_timeout_s > 2 * self.heartbeat_interval_s):
            problems.append(
                "lease_timeout_s must exceed twice heartbeat_interval_s "
                f"({self.lease_timeout_s} <= 2 x {self.heartbeat_interval_s})"
            )
        if self.checkpoint_every_steps < 0:
            problems.append(f"checkpoint_every_steps must be >= 0, got {self.checkpoint_every_steps}")
        if self.staleness < 0:
            problems.append(f"staleness must be >= 0, got {self.staleness}")
        if self.async_lr_scaling not in ASYNC_LR_SCALINGS:
            problems.append(
                f"async_lr_scaling must be one of {ASYNC_LR_SCALINGS}, got {self.async_lr_scaling!r}"
            )
        if self.eval_every_epochs < 0:
            problems.append(
                f"eval_every_epochs must be >= 0 (0: only the final evaluation), got {self.eval_every_epochs}"
            )
        if self.early_stopping_metric:
            if self.early_stopping_metric not in EARLY_STOPPING_METRICS:
                problems.append(
                    f"early_stopping_metric must be one of {tuple(EARLY_STOPPING_METRICS)} or empty, "
                    f"got {self.early_stopping_metric!r}"
                )
            if self.eval_every_epochs < 1:
                problems.append("early_stopping_metric needs eval_every_epochs >= 1 (it watches the validations)")
        if self.early_stopping_patience < 1:
            problems.append(f"early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
        if self.parameter_servers < 1:
            problems.append(f"parameter_servers must be >= 1, got {self.parameter_servers}")
        if not isinstance(self.optimizer_kwargs, Mapping):
            problems.append("optimizer_kwargs must be a table")
        problems += _lr_schedule_problems(self.lr_schedule, self.lr_schedule_kwargs)
        if isinstance(self.feature_columns, str) or not all(isinstance(c, str) and c for c in self.feature_columns):
            problems.append(f"feature_columns must be a list of column names, got {self.feature_columns!r}")
        else:
            object.__setattr__(self, "feature_columns", tuple(self.feature_columns))
        if not isinstance(self.label_column, str) or not self.label_column:
            problems.append(f"label_column must name a column, got {self.label_column!r}")
        problems += [p for p in (device_problem(self.device), precision_problem(self.precision)) if p]
        if not (0 <= self.clip_grad_norm < float("inf")):
            problems.append(f"clip_grad_norm must be a finite number >= 0 (0: off), got {self.clip_grad_norm}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0 (updates), got {self.warmup_steps}")
        if self.accumulate < 1:
            problems.append(f"accumulate must be >= 1 (batches per push), got {self.accumulate}")
        if self.gradient_compression not in GRADIENT_COMPRESSIONS:
            problems.append(
                f"gradient_compression must be one of {GRADIENT_COMPRESSIONS}, got {self.gradient_compression!r}"
            )
        if not (0 < self.topk_ratio <= 1):
            problems.append(
                f"topk_ratio must be in (0, 1] (the fraction of each tensor's elements a topk push sends), "
                f"got {self.topk_ratio}"
            )
        if problems:
            raise ConfigError("invalid job: " + "; ".join(problems))

    def replace(self, **changes: Any) -> JobSpec:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name for f in dataclasses.fields(JobSpec)}

# Per-workload recommended settings: a job on one of these built-in data sets takes these values
# for every field that neither its job file nor a flag sets (explicit values always win; any other
# data set takes JobSpec's defaults). This table is the one place the rule lives: `lepton up` and
# `lepton coordinator` both resolve a job through ``job_from_mapping``, and the resolved values are
# what the coordinator serves, `lepton status` shows and the report records. The figures behind
# them are in lepton/workloads.py (SYNTHETIC_IMAGE, SYNTHETIC_TEXT) and bench/reference.py.
RECOMMENDED: dict[str, Mapping[str, Any]] = {
    # the seed's settings: single-process 0.895-0.902 test accuracy (JobSpec's batch 32, Adam lr
    # 0.01, 10 epochs reach only 0.75)
    "synthetic-image": {"model": "mlp", "epochs": 3, "batch_size": 128, "optimizer": "adam", "lr": 1e-3},
    # embedding-bag with SparseAdam on the table: single-process 0.897-0.900
    "synthetic-text": {"model": "embedding-bag", "epochs": 3, "batch_size": 128, "optimizer": "adam", "lr": 1e-2},
    # regression on 353 training samples: single-process R2 0.57-0.60
    "diabetes": {"loss": "mse", "epochs": 20, "batch_size": 32, "optimizer": "adam", "lr": 1e-3, "shards_per_epoch": 4},
}


def recommended_settings(dataset: Any) -> dict[str, Any]:
    """The recommended JobSpec values for ``dataset`` ({} when it has none)."""
    return dict(RECOMMENDED.get(dataset, {})) if isinstance(dataset, str) else {}


def job_from_mapping(values: Mapping[str, Any], base: JobSpec | None = None) -> JobSpec:
    """Builds a JobSpec from a mapping (a parsed TOML table, flags); unknown keys are an error.

    Without ``base``, the fields ``values`` leaves out take the recommended settings of its data set
    (``RECOMMENDED``), then JobSpec's defaults. With ``base``, they keep the base's values.
    """
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown job fields {unknown}; known: {sorted(_FIELDS)}")
    if base is None:
        values = {**recommended_settings(values.get("dataset", JobSpec.dataset)), **values}
    try:
        return dataclasses.replace(base or JobSpec(), **dict(values))
    except TypeError as exc:
        raise ConfigError(f"invalid job: {exc}") from exc


def read_job_file(path: str | Path) -> dict[str, Any]:
    """The JobSpec fields a job TOML file sets: its top-level keys, or its ``[job]`` table."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read job file {path}: {exc}") from exc
    table = data.get("job", data)
    if not isinstance(table, Mapping):
        raise ConfigError(f"job file {path}: [job] must be a table")
    return dict(table)


def load_job_file(path: str | Path) -> JobSpec:
    """Reads a job TOML file (see ``read_job_file``) into a resolved JobSpec (``job_from_mapping``)."""
    return job_from_mapping(read_job_file(path))
