"""Adafactor, which reads whole tensors, through two real sync parameter servers (trained through
the worker's data path, as in test_equivalence.py) equals plain torch on the union of the batches:
the layout keeps each tensor whole on one server. The same run with the tensors sliced by rows (as
the layout cuts for element-wise optimizers) does not, which is why the layout must not."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lepton.optimizers import Granularity, granularity
from lepton.tensors import assemble
from support import ServedShard, serve_layout, stop_shards

from .test_equivalence import CALL_TIMEOUT_S, FULL_STEPS, batch, make_model, step_workers, train_through_servers

WORKERS, SERVERS = 2, 2
LR = 0.01


def reference_parameters() -> dict[str, torch.Tensor]:
    model = make_model()
    opt = torch.optim.Adafactor(model.parameters(), lr=LR)
    for step in range(FULL_STEPS + 1):
        samples = [batch(step, w) for w in step_workers(step, WORKERS)]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(
            model(torch.cat([s[0] for s in samples])), torch.cat([s[1] for s in samples])
        ).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def servers(request) -> Iterator[list[ServedShard]]:
    whole = request.param
    initial = {n: p.detach().clone() for n, p in make_model().named_parameters()}
    shards = serve_layout(
        initial, SERVERS, "adafactor", LR, {}, WORKERS, step_timeout_s=CALL_TIMEOUT_S, whole_tensors=whole
    )
    try:
        yield shards
    finally:
        stop_shards(shards)


def served_parameters(shards: list[ServedShard]) -> dict[str, torch.Tensor]:
    pieces: dict[str, torch.Tensor] = {}
    for shard in shards:
        version, tensors = shard.node.gate.snapshot()
        assert version == FULL_STEPS + 1
        pieces.update(tensors)
    return assemble([t for shard in shards for t in shard.specs], pieces)


@pytest.mark.parametrize("servers", [True], indirect=True, ids=["whole-tensors"])
def test_adafactor_through_two_servers_equals_torch(servers, record_property):
    assert granularity("adafactor") is Granularity.TENSOR  # what the coordinator's layout uses
    assert not any(t.is_slice for shard in servers for t in shard.specs)
    assert all(shard.specs for shard in servers)
    train_through_servers(servers, WORKERS)
    got, expected = served_parameters(servers), reference_parameters()
    record_property("max_abs_diff", max(float((got[n] - expected[n]).abs().max()) for n in expected))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("servers", [False], indirect=True, ids=["row-slices"])
def test_adafactor_on_row_slices_diverges_from_torch(servers):
    assert any(t.is_slice for shard in servers for t in shard.specs)
    train_through_servers(servers, WORKERS)
    got, expected = served_parameters(servers), reference_parameters()
    assert any(not torch.allclose(got[n], expected[n], rtol=1e-5, atol=1e-6) for n in expected)
