"""Server-side optimizers: any ``torch.optim`` class by name, with keyword arguments, and the
learning-rate schedules a job may name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lepton.errors import ConfigError


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The torch.optim class called ``name`` (case-insensitive). Raises ConfigError."""
    wanted = name.lower()
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if (
            attr.lower() == wanted
            and isinstance(obj, type)
            and issubclass(obj, torch.optim.Optimizer)
        ):
            return obj
    raise ConfigError(f"no optimizer {name!r} in torch.optim (try SGD, Adam, AdamW)")


def build_optimizer(
    params: Iterable[torch.Tensor], name: str, lr: float, kwargs: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """Constructs the optimizer; lists in kwargs become tuples (``betas``). Raises ConfigError."""
    cls = optimizer_class(name)
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return cls(list(params), lr=lr, **args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer {name} rejects {dict(kwargs)}: {exc}") from exc


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, kwargs: Mapping[str, Any]
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The torch scheduler for a JobSpec ``lr_schedule`` (None for "constant"), to be stepped once
    per optimizer step, so its epoch is the number of updates applied. Raises ConfigError."""
    if schedule == "constant":
        return None
    try:
        if schedule == "step":
            return torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=int(kwargs["step_size"]), gamma=float(kwargs.get("gamma", 0.1))
            )
        if schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=int(kwargs["t_max"]), eta_min=float(kwargs.get("eta_min", 0.0))
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"lr_schedule {schedule} rejects {dict(kwargs)}: {exc!r}") from exc
    raise ConfigError(f"no learning-rate schedule {schedule!r} (constant, step, cosine)")
