"""The parameter store: this server's tensors, the torch.optim optimizer that updates them and the
learning-rate schedule, which advances once per applied update: the lr of the update that makes
version ``v + 1`` is the schedule's value at ``v``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lepton.tensors import TensorSpec
from lepton.errors import InvalidArgument, NotFound
from lepton.optimizers import build_lr_scheduler, build_optimizer


class ParameterStore:
    """Owns named parameters, their optimizer and its learning-rate schedule. Not thread-safe: the
    gate serialises access.

    Raises ConfigError (unknown optimizer or schedule, bad arguments), InvalidArgument (bad
    gradient or checkpoint) and NotFound (unknown tensor name).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        optimizer: str,
        lr: float,
        optimizer_kwargs: Mapping[str, Any],
        lr_schedule: str = "constant",
        lr_schedule_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self._params = {
            name: torch.nn.Parameter(t.detach().clone(), requires_grad=t.is_floating_point())
            for name, t in tensors.items()
        }
        self.specs = {n: TensorSpec(n, p.dtype, tuple(p.shape)) for n, p in self._params.items()}
        trainable = [p for p in self._params.values() if p.requires_grad]
        self._optimizer = build_optimizer(trainable, optimizer, lr, optimizer_kwargs)
        self._lr_schedule = lr_schedule
        self._scheduler = build_lr_scheduler(self._optimizer, lr_schedule, lr_schedule_kwargs or {})
        self.version = 0

    @property
    def lr(self) -> float:
        """The learning rate the next update will use."""
        return float(self._optimizer.param_groups[0]["lr"])

    @property
    def names(self) -> list[str]:
        return list(self._params)

    def check_gradients(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Raises InvalidArgument unless ``grads`` has exactly our tensors, shapes, dtypes and is
        finite (NaN/Inf are rejected: one poisoned push would ruin every replica)."""
        missing = sorted(set(self._params) - set(grads))
        extra = sorted(set(grads) - set(self._params))
        if missing or extra:
            raise InvalidArgument(
                f"a push must carry exactly this server's tensors; missing {missing[:8]}, "
                f"unexpected {extra[:8]}"
            )
        for name, g in grads.items():
            spec = self.specs[name]
            if g.dtype != spec.dtype or tuple(g.shape) != spec.shape:
                raise InvalidArgument(
                    f"gradient {name!r} is {g.dtype} {list(g.shape)}, expected "
                    f"{spec.dtype} {list(spec.shape)}"
                )
            if g.is_floating_point() and not bool(torch.isfinite(g).all()):
                raise InvalidArgument(f"gradient {name!r} contains NaN or Inf; rejected")

    def apply(self, grads: Mapping[str, torch.Tensor]) -> int:
        """One optimizer step with these gradients; returns the new version."""
        for name, p in self._params.items():
            if p.requires_grad:
                p.grad = grads[name]
        self._optimizer.step()
        if self._scheduler is not None:
            self._scheduler.step()
        for p in self._params.values():
            p.grad = None
        self.version += 1
        return self.version

    def state_dict(self) -> dict[str, Any]:
        """Copies of everything a restart needs: version, tensors, optimizer and schedule state."""
        state = {
            "version": self.version,
            "params": {n: p.detach().clone() for n, p in self._params.items()},
            "optimizer": self._optimizer.state_dict(),
        }
        if self._scheduler is not None:
            state["lr_schedule"] = self._lr_schedule
            state["lr_scheduler"] = self._scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a checkpoint of the same tensors and schedule. Raises InvalidArgument if they
        differ."""
        params = state["params"]
        schedule = state.get("lr_schedule", "constant")  # checkpoints before schedules: constant
        if schedule != self._lr_schedule:
            raise InvalidArgument(
                f"checkpoint was written under lr_schedule {schedule!r}, this job has {self._lr_schedule!r}"
            )
        if set(params) != set(self._params):
            raise InvalidArgument(
                f"checkpoint holds tensors {sorted(params)[:8]}, this server holds {sorted(self._params)[:8]}"
            )
        with torch.no_grad():
            for name, value in params.items():
                spec = self.specs[name]
                if value.dtype != spec.dtype or tuple(value.shape) != spec.shape:
                    raise InvalidArgument(f"checkpoint tensor {name!r} does not match {spec}")
                self._params[name].copy_(value)
        self._optimizer.load_state_dict(state["optimizer"])  # holds the current lr
        if self._scheduler is not None:
            self._scheduler.load_state_dict(state["lr_scheduler"])
        self.version = int(state["version"])

    def snapshot(self, names: Iterable[str] | None = None) -> list[tuple[str, torch.Tensor]]:
        """Copies of the named tensors (all when ``names`` is None or empty)."""
        wanted = list(names) if names else list(self._params)
        unknown = [n for n in wanted if n not in self._params]
        if unknown:
            raise NotFound(f"tensors not held by this server: {unknown[:8]}")
        return [(n, self._params[n].detach().clone()) for n in wanted]
