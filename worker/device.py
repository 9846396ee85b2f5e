"""Where a worker trains and at what precision: resolving ``--device`` to a torch device (refusing
one this machine lacks), autocast for the forward and backward passes, the fp16 loss scaler, host
buffers gradients travel from, and clipping by global norm."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch

from lepton.config import device_problem, precision_problem
from lepton.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` (auto, cpu, cuda, cuda:N) stands for on this machine; "auto" is
    cuda:0 where CUDA is available, else the CPU. Raises ConfigError, naming the device, for a
    name that is none or a CUDA device this machine does not have."""
    problem = device_problem(name)
    if problem is not None:
        raise ConfigError(problem)
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {name} was requested, but this machine has no CUDA device (torch {torch.__version__})"
        )
    device = torch.device(name)
    index = 0 if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"device {name} was requested, but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def check_precision(precision: str, device: torch.device) -> None:
    """Raises ConfigError for a precision that is none, or that ``device`` cannot run."""
    problem = precision_problem(precision)
    if problem is not None:
        raise ConfigError(problem)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"precision bf16 was requested, but {device} ({name}) has no bfloat16")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context forward passes (and the loss) run in: torch.autocast for bf16 and fp16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


class LossScaler:
    """Dynamic loss scaling for fp16 with torch.amp.GradScaler's defaults and rule, for gradients
    that leave the process instead of reaching a local optimizer: the loss is multiplied by
    ``scale`` before backward, the gradients divided by it after; a step with a non-finite gradient
    is skipped (nothing pushed) and halves the scale; ``growth_interval`` finite steps in a row
    double it."""

    def __init__(
        self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self.scale = init_scale
        self._growth, self._backoff, self._interval = growth_factor, backoff_factor, growth_interval
        self._good = 0
        self.skipped = 0

    def unscale(self, grads: Iterable[torch.Tensor]) -> bool:
        """Divides every gradient by the scale in place; returns whether all are finite, and
        updates the scale accordingly."""
        finite = True
        inverse = 1.0 / self.scale
        for g in grads:
            values = g._values() if g.is_sparse else g
            values.mul_(inverse)
            if finite and not bool(torch.isfinite(values).all()):
                finite = False
        if finite:
            self._good += 1
            if self._good >= self._interval:
                self.scale *= self._growth
                self._good = 0
        else:
            self.scale *= self._backoff
            self._good = 0
            self.skipped += 1
        return finite


def clip_by_global_norm(grads: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scales ``grads`` in place by min(1, max_norm / (norm + 1e-6)), norm the L2 norm of all of
    them together (a sparse one counts its values), as torch.nn.utils.clip_grad_norm_; returns the
    norm before clipping."""
    grads = list(grads)
    if not grads:
        return 0.0
    norms = [torch.linalg.vector_norm((g.coalesce()._values() if g.is_sparse else g).float()) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        if g.is_sparse:
            g._values().mul_(coef.to(g.device))  # coalesced by the caller or not: scaling is linear
        else:
            g.mul_(coef.to(g.device))
    return float(total)


class HostBuffers:
    """Page-locked host tensors, one per name, reused step after step, that a CUDA gradient is
    copied into (asynchronously) before it is encoded and pushed. On the CPU, gradients are
    already in host memory and pass through as they are."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def to_host(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._device.type == "cpu":
            return dict(tensors)
        out = {}
        for name, t in tensors.items():
            if t.is_sparse:
                out[name] = t.coalesce().cpu()  # its row count changes from batch to batch
                continue
            buffer = self._buffers.get(name)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
                buffer = self._buffers[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buffer.copy_(t, non_blocking=True)
            out[name] = buffer
        torch.cuda.synchronize(self._device)
        return out


