"""Server-side optimizers: any ``torch.optim`` class by name, with keyword arguments, and the
learning-rate schedules a job may name; which of them may be sliced across servers, and the check
that proves a job's optimizer works before anything is served."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch

from lepton.errors import ConfigError
from lepton.tensors import empty_row_sparse


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


class Granularity(Enum):
    """What one update of an optimizer reads, and so how finely the layout may cut a tensor."""

    ELEMENT = "element"  # each element's update reads its own gradient and state: rows may be sliced
    TENSOR = "tensor"  # the update reads the whole tensor (norms, factored moments): keep it whole


# Verified against torch 2.13's source: per-element state and arithmetic, the only scalars (step
# count, ASGD's eta and mu, NAdam's mu_product) depend on the step count and hyperparameters alone.
ELEMENT_WISE: frozenset[str] = frozenset(
    {"sgd", "adam", "adamw", "adamax", "nadam", "radam", "adagrad", "adadelta", "rmsprop", "rprop", "asgd",
     "sparseadam"}
)
# Optimizers whose update of a tensor reads all of that tensor, and why.
PER_TENSOR: dict[str, str] = {
    "adafactor": "factored row/column second moments, the parameter's RMS and update clipping by norm",
    "muon": "Newton-Schulz orthogonalisation of each 2-D gradient matrix",
}
# Optimizers no parameter server can run, and why.
REFUSED: dict[str, str] = {
    "lbfgs": "it needs a closure that re-evaluates the loss, and its line search treats all parameters "
    "as one vector; a parameter server only receives gradients",
}


def granularity(name: str) -> Granularity:
    """How finely the layout may cut tensors for optimizer ``name``: ELEMENT for the element-wise
    ones, TENSOR for the rest (any torch.optim class not listed here, to be safe).

    Raises:
        ConfigError: unknown optimizer, or one in ``REFUSED`` (the message names it and why).
    """
    cls = optimizer_class(name)
    key = cls.__name__.lower()
    if key in REFUSED:
        raise ConfigError(f"optimizer {cls.__name__} cannot be served by parameter servers: {REFUSED[key]}")
    return Granularity.ELEMENT if key in ELEMENT_WISE else Granularity.TENSOR


def _zero_gradient(p: torch.Tensor, sparse: bool) -> torch.Tensor:
    if sparse:  # no rows touched: an empty row-sparse gradient, as a server builds it
        return empty_row_sparse(p)
    return torch.zeros_like(p)


def prove_optimizer(
    named_params: Iterable[tuple[str, torch.Tensor]],
    sparse: Collection[str],
    name: str,
    lr: float,
    kwargs: Mapping[str, Any],
    lr_schedule: str = "constant",
    lr_schedule_kwargs: Mapping[str, Any] | None = None,
    warmup_steps: int = 0,
) -> Granularity:
    """Proves that the servers can run this optimizer: builds it and its schedule on copies of
    the parameters, takes one optimizer step and one schedule step with zero gradients (empty
    row-sparse ones for ``sparse``), and checks that every parameter stays finite. Returns how
    finely the layout may cut tensors for it. In a process without ``torch._dynamo`` it runs
    under ``_eager_dynamo_stand_in`` and does not import it.

    Raises:
        ConfigError: the optimizer is unknown or refused, or building or stepping it fails (with
            torch's own message), or a parameter is no longer finite after the step.
    """
    kind = granularity(name)
    if "torch._dynamo" not in sys.modules:
        try:
            with _eager_dynamo_stand_in():
                _prove(named_params, sparse, name, lr, kwargs, lr_schedule, lr_schedule_kwargs, warmup_steps)
            return kind
        except ConfigError as exc:
            if "_dynamo" not in str(exc):
                raise
            # decided below, by torch itself: the stand-in must never be why a job is refused
    _prove(named_params, sparse, name, lr, kwargs, lr_schedule, lr_schedule_kwargs, warmup_steps)
    return kind


def _prove(
    named_params: Iterable[tuple[str, torch.Tensor]],
    sparse: Collection[str],
    name: str,
    lr: float,
    kwargs: Mapping[str, Any],
    lr_schedule: str,
    lr_schedule_kwargs: Mapping[str, Any] | None,
    warmup_steps: int,
) -> None:
    copies = [
        (n, torch.nn.Parameter(p.detach().clone(), requires_grad=True))
        for n, p in named_params
        if p.is_floating_point()
    ]
    try:
        optimizer = build_sparse_aware_optimizer(copies, sparse, name, lr, kwargs)
        scheduler = build_lr_scheduler(optimizer, lr_schedule, lr_schedule_kwargs or {}, warmup_steps)
        for n, p in copies:
            p.grad = _zero_gradient(p, n in sparse)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever torch raises refuses the job, in its words
        raise ConfigError(
            f"optimizer {name} with lr {lr:g} and {dict(kwargs)} fails its first step: {type(exc).__name__}: {exc}"
        ) from exc
    broken = [n for n, p in copies if not bool(torch.isfinite(p.detach()).all())]
    if broken:
        raise ConfigError(
            f"optimizer {name} with lr {lr:g} and {dict(kwargs)} makes parameters {broken[:4]} non-finite "
            "after one step with a zero gradient"
        )


@contextmanager
def _eager_dynamo_stand_in() -> Iterator[None]:
    """For the duration of a proof in a process that has not imported ``torch._dynamo`` (1.2 s of
    CPU): a stand-in for the two things eager torch.optim takes from it, ``disable`` (wraps a
    function so that a compiler will not trace it: in eager code the function itself) and
    ``graph_break`` (a no-op outside a compiler). Removed on exit, with the wrappers torch cached
    on the functions it disabled, so a later real import sees torch as it was. Single-threaded
    callers only (the coordinator before it serves)."""
    disabled: list[Callable[..., Any]] = []

    def disable(fn: Callable[..., Any] | None = None, recursive: bool = True, **_: Any) -> Any:
        if fn is None:
            return lambda f: disable(f, recursive)
        disabled.append(fn)
        return fn

    stand_in = types.ModuleType("torch._dynamo", "eager stand-in (lepton.optimizers.prove_optimizer)")
    stand_in.disable = disable  # type: ignore[attr-defined]
    stand_in.graph_break = lambda msg="": None  # type: ignore[attr-defined]
    sys.modules["torch._dynamo"] = stand_in
    torch._dynamo = stand_in  # type: ignore[attr-defined]  # torch's lazy module getattr is bypassed
    try:
        yield
    finally:
        if sys.modules.get("torch._dynamo") is stand_in:
            del sys.modules["torch._dynamo"]
        if torch.__dict__.get("_dynamo") is stand_in:
            del torch._dynamo  # type: ignore[attr-defined]
        for fn in disabled:
            fn.__dict__.pop("__dynamo_disable", None)


def build_optimizer(
    params: Iterable[torch.Tensor], name: str, lr: float, kwargs: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """Constructs the optimizer; lists in kwargs become tuples (``betas``). Raises ConfigError."""
    cls: Callable[..., torch.optim.Optimizer] = optimizer_class(name)  # subclasses take lr and kwargs
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return cls(list(params), lr=lr, **args)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:  # torch's checks index
        # and compare what they are given: betas=[0.9] raises IndexError
        raise ConfigError(f"optimizer {name} rejects {dict(kwargs)}: {exc}") from exc


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, kwargs: Mapping[str, Any], warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The torch scheduler for a JobSpec ``lr_schedule`` (None for "constant" without warmup), to
    be stepped once per optimizer step, so its epoch is the number of updates applied. With
    ``warmup_steps`` W > 0, a ``LinearLR`` from 1 / (W + 1) to 1 over W updates chained with the
    schedule (``ChainedScheduler``: the factors multiply), so update v (0-based) runs at the
    schedule's rate times min(1, (v + 1) / (W + 1)). Raises ConfigError."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be an integer >= 0 (updates), got {warmup_steps!r}")
    if warmup_steps == 0:
        return _schedule(optimizer, schedule, kwargs)
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps
    )
    after = _schedule(optimizer, schedule, kwargs)
    if after is None:
        return warmup
    return torch.optim.lr_scheduler.ChainedScheduler([warmup, after], optimizer=optimizer)


def _schedule(
    optimizer: torch.optim.Optimizer, schedule: str, kwargs: Mapping[str, Any]
) -> torch.optim.lr_scheduler.LRScheduler | None:
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


# What torch.optim.SparseAdam takes besides lr; every other Adam/AdamW keyword is the dense part's.
_SPARSE_ADAM_KEYS = ("betas", "eps", "maximize")


class CombinedOptimizer(torch.optim.Optimizer):
    """Several torch optimizers over disjoint parameters, stepped as one: a dense optimizer and a
    sparse one (``torch.optim.SparseAdam``) for a model with embedding tables.

    ``param_groups`` is the list of every child's groups, in the children's order, and those are
    the children's own group dicts, so a ``torch.optim.lr_scheduler`` built on this object (for
    example by ``build_lr_scheduler``) sets the learning rate of every child. ``step`` and
    ``zero_grad`` go to every child; ``state_dict`` is ``{"optimizers": [child state dicts]}``.
    Hooks and ``add_param_group`` are not supported (the base class's ``__init__`` is not run:
    the children own the parameters and their state).
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ConfigError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizers[0].defaults

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of every child; ``closure`` (if any) is evaluated once, before."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restores every child. Raises ValueError when the number of children differs."""
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"state of {len(states)} optimizers, this one combines {len(self.optimizers)}")
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError("add the group to one of CombinedOptimizer.optimizers")

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


def build_sparse_aware_optimizer(
    named_params: Iterable[tuple[str, torch.Tensor]],
    sparse: Collection[str],
    name: str,
    lr: float,
    kwargs: Mapping[str, Any],
) -> torch.optim.Optimizer:
    """The job's optimizer for parameters of which those named in ``sparse`` get row-sparse
    gradients (``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``); the one builder for
    everyone who must apply the same mathematics (parameter servers, the single-process reference).

    The rule, by optimizer name (case-insensitive):

    - no sparse parameter: exactly ``build_optimizer`` (any torch.optim class).
    - ``sgd`` and ``adagrad``: one torch optimizer over all the parameters; torch applies sparse
      gradients itself, and the result equals the dense update with zero gradient on the rows a
      step does not touch (SGD momentum and Nesterov included: the momentum buffer of a sparse
      parameter is itself sparse, so a row never touched never moves). Refused, as torch refuses
      them with sparse gradients: ``weight_decay`` other than 0 and ``fused=True``.
    - ``adam`` and ``adamw``: ``torch.optim.SparseAdam`` (lazy Adam: only the rows in a step's
      gradient have their moments and values updated, with bias correction by the global step
      count) over the sparse parameters, with the job's ``lr`` and its ``betas``, ``eps`` and
      ``maximize``; the named optimizer with all the job's keywords over the rest. Keywords that
      SparseAdam lacks (``weight_decay``, AdamW's default 0.01 included, ``amsgrad``, ``foreach``,
      ...) therefore reach the dense parameters only: embedding rows are never weight-decayed.
    - ``sparseadam``: only when every parameter is sparse.
    - any other optimizer: refused (torch has no sparse form of it).

    Returns a torch optimizer when one suffices, else a ``CombinedOptimizer`` (dense first, then
    SparseAdam) whose ``param_groups`` are its children's: ``build_lr_scheduler`` on either drives
    the learning rate of every parameter, and ``step``, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` cover them all.

    Raises:
        ConfigError: unknown optimizer or bad arguments, a name in ``sparse`` that is not a
            parameter, or a combination torch refuses for sparse gradients.
    """
    params = dict(named_params)
    unknown = sorted(set(sparse) - set(params))
    if unknown:
        raise ConfigError(f"sparse parameters {unknown[:8]} are not among the parameters")
    sparse_params = [p for n, p in params.items() if n in sparse]
    dense_params = [p for n, p in params.items() if n not in sparse]
    cls = optimizer_class(name)
    if not sparse_params:
        return build_optimizer(dense_params, name, lr, kwargs)
    if cls in (torch.optim.SGD, torch.optim.Adagrad):
        refused = {
            key: kwargs[key]
            for key, harmless in (("weight_decay", 0), ("fused", None))
            if key in kwargs and kwargs[key] not in (harmless, False)
        }
        if refused:
            raise ConfigError(
                f"optimizer {name} cannot apply {refused} to sparse gradients (of {sorted(sparse)[:8]}); "
                "torch refuses it"
            )
        return build_optimizer(params.values(), name, lr, kwargs)
    if cls is torch.optim.SparseAdam and not dense_params:
        return build_optimizer(sparse_params, name, lr, kwargs)
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        sparse_kwargs = {key: kwargs[key] for key in _SPARSE_ADAM_KEYS if key in kwargs}
        sparse_opt = build_optimizer(sparse_params, "SparseAdam", lr, sparse_kwargs)
        if not dense_params:
            return sparse_opt
        return CombinedOptimizer([build_optimizer(dense_params, name, lr, kwargs), sparse_opt])
    raise ConfigError(
        f"optimizer {name} has no sparse-gradient form for {sorted(sparse)[:8]}; "
        "use sgd, adagrad, adam or adamw"
    )
