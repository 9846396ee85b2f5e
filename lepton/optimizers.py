"""Server-side optimizers: any ``torch.optim`` class by name, with keyword arguments."""

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
