"""The parameter store: this server's tensors, the torch.optim optimizer that updates them and the
learning-rate schedule, which advances once per applied update: the lr of the update that makes
version ``v + 1`` is the schedule's value at ``v``."""

from __future__ import annotations

import copy as _copy
import math
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch

from lepton.errors import InvalidArgument, NotFound, OptimizerFailed
from lepton.optimizers import build_lr_scheduler, build_sparse_aware_optimizer
from lepton.tensors import TensorKind, TensorSpec, check_rows, empty_row_sparse

# Optimizers whose foreach implementation gives bit-for-bit the for-loop's results on float32 and
# float64 tensors (tests/unit/test_optimizer_serving.py proves it); the store uses it unless the
# job says otherwise. Their fused CPU kernels do not (they differ in the last bits).
FOREACH_EXACT = frozenset({"sgd", "adam", "adamw"})
_FOREACH_DTYPES = (torch.float32, torch.float64)


def _finite(values: torch.Tensor) -> bool:
    """Whether every element is finite: a NaN or Inf makes the sum NaN or Inf, so a finite sum
    (one read, no temporary) proves it; a sum that overflowed is checked element by element."""
    return math.isfinite(values.sum().item()) or bool(torch.isfinite(values).all())


class ParameterStore:
    """Owns named tensors (trainable parameters, frozen parameters and buffers: ``kinds``), the
    optimizer of the trainable ones and its learning-rate schedule. Not thread-safe: the gate
    serialises access.

    torch.optim's rule holds per update: a trainable tensor without a gradient in it (absent from
    the push, as torch's ``grad is None``) is skipped by the optimizer, so neither weight decay nor
    momentum reaches it. Frozen tensors never change; a buffer moves by the change a push carries.

    Raises ConfigError (unknown optimizer or schedule, bad arguments), InvalidArgument (bad
    gradient or checkpoint), NotFound (unknown tensor name) and OptimizerFailed (a step raised;
    from then on ``failure`` says why and every update is refused, as torch may have changed part
    of the parameters or state before raising).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        optimizer: str,
        lr: float,
        optimizer_kwargs: Mapping[str, Any],
        lr_schedule: str = "constant",
        lr_schedule_kwargs: Mapping[str, Any] | None = None,
        sparse: Collection[str] = (),
        kinds: Mapping[str, TensorKind] | None = None,
        warmup_steps: int = 0,
    ) -> None:
        kinds = kinds or {}
        unknown = sorted((set(sparse) | set(kinds)) - set(tensors))
        if unknown:
            raise InvalidArgument(f"sparse or kinded tensors {unknown[:8]} are not among this server's tensors")
        self.sparse = frozenset(sparse)
        # Without a kind (senders before TensorInfo.kind), an integer tensor cannot be trained: a buffer.
        kind_of = {
            name: kinds.get(name, TensorKind.PARAMETER if t.is_floating_point() else TensorKind.BUFFER)
            for name, t in tensors.items()
        }
        not_float = sorted(
            n for n, t in tensors.items() if kind_of[n] is TensorKind.PARAMETER and not t.is_floating_point()
        )
        if not_float:
            raise InvalidArgument(f"trainable tensors {not_float[:8]} are not floating point")
        self._params = {
            name: torch.nn.Parameter(t.detach().clone(), requires_grad=kind_of[name] is TensorKind.PARAMETER)
            for name, t in tensors.items()
        }
        self.specs = {
            n: TensorSpec(n, p.dtype, tuple(p.shape), sparse=n in self.sparse, kind=kind_of[n])
            for n, p in self._params.items()
        }
        self.buffers = frozenset(n for n, k in kind_of.items() if k is TensorKind.BUFFER)
        trainable = [(n, p) for n, p in self._params.items() if p.requires_grad]
        if not trainable:
            # Only frozen tensors and buffers here: the optimizer gets a placeholder that never has a
            # gradient, so the schedule still runs and every step is a no-op.
            trainable = [("(no trainable tensor)", torch.nn.Parameter(torch.zeros(())))]
        # Row-sparse tensors get the sparse-aware variant (SparseAdam for adam/adamw), exactly as a
        # single process would build it for the same model (lepton.optimizers).
        self._optimizer_name = optimizer
        self.failure = ""
        kwargs = dict(optimizer_kwargs)
        if (
            optimizer.lower() in FOREACH_EXACT and not self.sparse and "foreach" not in kwargs and "fused" not in kwargs
            and all(p.dtype in _FOREACH_DTYPES for _, p in trainable)
        ):
            kwargs["foreach"] = True  # one pass over all tensors per operation: the same numbers, faster
        self._optimizer = build_sparse_aware_optimizer(trainable, self.sparse, optimizer, lr, kwargs)
        # A checkpoint names the schedule it was written under (warmup included): it restores only into the same.
        self._lr_schedule = f"{lr_schedule}+warmup{warmup_steps}" if warmup_steps else lr_schedule
        self._scheduler = build_lr_scheduler(self._optimizer, lr_schedule, lr_schedule_kwargs or {}, warmup_steps)
        self.version = 0

    @property
    def lr(self) -> float:
        """The learning rate the next update will use."""
        return float(self._optimizer.param_groups[0]["lr"])

    @property
    def names(self) -> list[str]:
        return list(self._params)

    def check_gradients(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Raises InvalidArgument unless ``grads`` holds only this server's trainable tensors and
        buffers (any may be absent: no gradient, or an unchanged buffer), in their shapes and
        dtypes, sparse COO exactly for the sparse tensors, and finite (NaN/Inf are rejected: one
        poisoned push would ruin every replica)."""
        extra = sorted(set(grads) - set(self._params))
        if extra:
            raise InvalidArgument(f"a push carries unexpected tensors {extra[:8]}: this server does not hold them")
        frozen = sorted(n for n in grads if not self.specs[n].pushed)
        if frozen:
            raise InvalidArgument(f"tensors {frozen[:8]} are frozen (requires_grad=False): push no gradient for them")
        for name, g in grads.items():
            spec = self.specs[name]
            if g.dtype != spec.dtype or tuple(g.shape) != spec.shape:
                raise InvalidArgument(
                    f"gradient {name!r} is {g.dtype} {list(g.shape)}, expected "
                    f"{spec.dtype} {list(spec.shape)}"
                )
            if g.is_sparse != (name in self.sparse):
                raise InvalidArgument(
                    f"gradient {name!r} must be pushed "
                    + ("by rows (RowSelection): it is row-sparse" if name in self.sparse else "whole: it is dense")
                )
            values = g._values() if g.is_sparse else g
            if values.is_floating_point() and not _finite(values):
                raise InvalidArgument(f"gradient {name!r} contains NaN or Inf; rejected")

    def apply(self, grads: Mapping[str, torch.Tensor], lr_scale: float = 1.0) -> int:
        """One update: an optimizer step over the trainable tensors that have a gradient in
        ``grads``, at ``lr_scale`` times the schedule's learning rate (async staleness scaling), and
        each buffer change in ``grads`` added to its buffer; returns the new version. A row-sparse
        tensor without a gradient gets an empty one (no rows touched: torch steps the whole table).
        Raises OptimizerFailed if the step raises, or did before."""
        if self.failure:
            raise OptimizerFailed(self.failure)
        for name, p in self._params.items():
            if p.requires_grad:
                g = grads.get(name)
                if g is None and name in self.sparse:
                    g = empty_row_sparse(p)
                p.grad = None if g is None else (g.coalesce() if g.is_sparse else g)
        try:
            self._step(lr_scale)
            if self._scheduler is not None:
                self._scheduler.step()
        except Exception as exc:  # noqa: BLE001 - any error of torch's ends this store's updates
            self.failure = (
                f"optimizer {self._optimizer_name} failed at update {self.version + 1}: {type(exc).__name__}: {exc}"
            )
            raise OptimizerFailed(self.failure) from exc
        finally:
            for p in self._params.values():
                p.grad = None
        with torch.no_grad():
            for name in self.buffers & set(grads):
                self._params[name].add_(grads[name].to(self._params[name].dtype))
        self.version += 1
        return self.version

    def _step(self, lr_scale: float) -> None:
        """``optimizer.step()`` with every group's lr times ``lr_scale`` for this step alone: the
        groups' own values are restored before the schedule steps (torch's schedulers compute the
        next lr from the groups' current one), so the schedule never sees a scaled rate."""
        if lr_scale == 1.0:
            self._optimizer.step()
            return
        groups = self._optimizer.param_groups
        saved = [group["lr"] for group in groups]
        for group, lr in zip(groups, saved, strict=True):
            group["lr"] = lr * lr_scale
        try:
            self._optimizer.step()
        finally:
            for group, lr in zip(groups, saved, strict=True):
                group["lr"] = lr

    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """Copies of everything a restart needs: version, tensors, optimizer and schedule state.
        ``copy=False``: the live tensors themselves, for a caller that copies them at once."""
        optimizer = self._optimizer.state_dict()
        state = {
            "version": self.version,
            "params": {n: p.detach().clone() if copy else p.detach() for n, p in self._params.items()},
            # torch's state_dict() holds the live moment tensors, which the next update changes in
            # place; a captured checkpoint is written later, so it must own copies
            "optimizer": _copy.deepcopy(optimizer) if copy else optimizer,
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

    def snapshot(
        self, names: Iterable[str] | None = None, rows: Mapping[str, torch.Tensor] | None = None, copy: bool = True
    ) -> list[tuple[str, torch.Tensor]]:
        """Copies of the named tensors (all when both ``names`` and ``rows`` are empty) and of the
        selected rows of the tensors in ``rows`` (checked: distinct, in range). ``copy=False``:
        the whole tensors themselves (detached), for a reader that copies them at once."""
        rows = rows or {}
        wanted = list(names) if names else ([] if rows else list(self._params))
        unknown = [n for n in [*wanted, *rows] if n not in self._params]
        if unknown:
            raise NotFound(f"tensors not held by this server: {unknown[:8]}")
        both = sorted(set(wanted) & set(rows))
        if both:
            raise InvalidArgument(f"tensors {both[:8]} asked for both whole and by rows")
        out = [(n, self._params[n].detach().clone() if copy else self._params[n].detach()) for n in wanted]
        for name, selected in rows.items():
            p = self._params[name]
            if p.dim() == 0:
                raise InvalidArgument(f"tensor {name!r} has no rows (0-dim)")
            check_rows(name, selected, p.shape[0])
            out.append((name, p.detach().index_select(0, selected)))
        return out
