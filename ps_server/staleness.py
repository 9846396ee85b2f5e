"""How an async parameter server sets the learning rate of one push from its staleness.

Staleness ``s`` is the server's version when a push arrives minus the version its gradient was
computed from. With ``W`` workers pushing, each computing a gradient while the others push, the
steady state is ``s ≈ W - 1``; a worker the operating system descheduled, or one on a busy machine,
pushes gradients that are many updates old, and applied at the full rate they pull the parameters
back towards where they were (digits, 3 workers on 2 cores: the mean stayed at 1.9-2.0 in every
run, loaded or not, while single pushes reached staleness 9-28).

``StalenessAwareLr`` follows Zhang et al., "Staleness-aware Async-SGD" (IJCAI 2016), which divides
the rate by the push's staleness, normalised to the steady state so that a job tuned without it
trains the same when nothing is late: a push with ``s <= max(1, W - 1)`` gets the full rate, a
staler one ``max(1, W - 1) / s`` of it. The server scales the rate of that one optimizer step and
restores it (``ParameterStore.apply``), never the gradient: Adam's step is nearly invariant to the
gradient's scale, so scaling the gradient would change nothing there. Pure functions, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lepton.errors import ConfigError


class LrScaling(Protocol):
    """Decides the learning-rate multiplier of one async push."""

    def lr_scale(self, staleness: int, workers: int) -> float:
        """The multiplier (in (0, 1]) for a push of this staleness with ``workers`` pushing."""
        ...


@dataclass(frozen=True)
class ConstantLr:
    """Every push at the schedule's rate (``async_lr_scaling = "none"``)."""

    def lr_scale(self, staleness: int, workers: int) -> float:
        return 1.0


@dataclass(frozen=True)
class StalenessAwareLr:
    """``min(1, max(1, workers - 1) / staleness)`` (``async_lr_scaling = "staleness"``)."""

    def lr_scale(self, staleness: int, workers: int) -> float:
        tolerance = max(1, workers - 1)
        return 1.0 if staleness <= tolerance else tolerance / staleness


@dataclass(frozen=True)
class InverseStalenessLr:
    """``1 / max(1, staleness)`` for every push, Zhang et al.'s rule as published
    (``async_lr_scaling = "inverse"``): the steady state of W workers runs at about 1 / (W - 1) of
    the rate, so a job tuned without it needs a larger base rate."""

    def lr_scale(self, staleness: int, workers: int) -> float:
        return 1.0 / max(1, staleness)


STALENESS_AWARE = StalenessAwareLr()  # the default
_POLICIES: dict[str, LrScaling] = {
    "staleness": STALENESS_AWARE, "inverse": InverseStalenessLr(), "none": ConstantLr(),
}


def staleness_lr_scaling(name: str) -> LrScaling:
    """The policy a JobSpec's ``async_lr_scaling`` names. Raises ConfigError for another name."""
    try:
        return _POLICIES[name]
    except KeyError:
        raise ConfigError(f"async_lr_scaling must be one of {tuple(_POLICIES)}, got {name!r}") from None
