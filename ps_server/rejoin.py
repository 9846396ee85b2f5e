"""What a parameter server that was fenced while alive does next: take its id back or step aside,
and keep serving what it holds or load afresh. Pure decisions; ps_server.agent carries them out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum

import torch

from lepton.tensors import TensorSpec


class AfterFence(Enum):
    REJOIN = "rejoin"  # declared dead while it was alive (a paused coordinator, a partition)
    STEP_ASIDE = "step_aside"  # a newer incarnation holds the id: another process replaced this one


def after_fence(member_id: str, incarnation: int, known: Iterable[tuple[str, int]]) -> AfterFence:
    """Decides from the coordinator's members, as (member id, incarnation) pairs.

    Re-registering over a newer incarnation would fence a replacement that is serving, and the two
    would take turns fencing each other; a server only reclaims an id nobody newer holds.
    """
    latest = max((inc for mid, inc in known if mid == member_id), default=incarnation)
    return AfterFence.STEP_ASIDE if latest > incarnation else AfterFence.REJOIN


def keeps_state(served: Mapping[str, TensorSpec] | None, assigned: Mapping[str, torch.Tensor]) -> bool:
    """True when the server already serves exactly the assigned tensors (names, shapes, dtypes):
    its live parameters are newer than any checkpoint, so it reports them instead of reloading."""
    if served is None or set(served) != set(assigned):
        return False
    return all(
        served[n].shape == tuple(t.shape) and served[n].dtype == t.dtype for n, t in assigned.items()
    )
