"""The parameter layout: every tensor on exactly one server, balanced by bytes, deterministic."""

from __future__ import annotations

import random

import pytest
import torch

from coordinator.layout import balance
from lepton.errors import InvalidArgument
from lepton.tensors import TensorSpec


def specs(seed: int = 0, count: int = 23) -> list[TensorSpec]:
    rng = random.Random(seed)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]
    return [
        TensorSpec(
            f"layer{i}.w",
            rng.choice(dtypes),
            tuple(rng.randint(0, 9) for _ in range(rng.randint(0, 3))),
        )
        for i in range(count)
    ]


SERVERS = ["ps-0", "ps-1", "ps-2"]


@pytest.mark.parametrize("seed", range(5))
def test_every_tensor_is_placed_exactly_once(seed):
    tensors = specs(seed)
    layout = balance(tensors, SERVERS, version=1)
    placed = [t for s in SERVERS for t in layout.tensors_of(s)]
    assert sorted(t.name for t in placed) == sorted(t.name for t in tensors)
    assert set(placed) == set(tensors)
    assert layout.servers == tuple(SERVERS) and layout.version == 1


@pytest.mark.parametrize("seed", range(5))
def test_bytes_are_balanced_within_the_largest_tensor(seed):
    tensors = specs(seed)
    layout = balance(tensors, SERVERS, version=1)
    loads = [layout.bytes_of(s) for s in SERVERS]
    largest = max(t.nbytes for t in tensors)
    assert sum(loads) == sum(t.nbytes for t in tensors)
    assert max(loads) - min(loads) <= largest
    assert max(loads) <= sum(loads) / len(SERVERS) + largest


def test_equal_tensors_spread_evenly():
    tensors = [TensorSpec(f"t{i}", torch.float32, (10,)) for i in range(6)]
    layout = balance(tensors, SERVERS, version=1)
    assert [layout.bytes_of(s) for s in SERVERS] == [80, 80, 80]
    assert [len(layout.tensors_of(s)) for s in SERVERS] == [2, 2, 2]


def test_largest_first_goes_to_the_first_server_and_the_rest_fill_the_gap():
    tensors = [
        TensorSpec("big", torch.float32, (100,)),
        TensorSpec("a", torch.float32, (30,)),
        TensorSpec("b", torch.float32, (30,)),
        TensorSpec("c", torch.float32, (30,)),
    ]
    layout = balance(tensors, ["ps-0", "ps-1"], version=3)
    assert [t.name for t in layout.tensors_of("ps-0")] == ["big"]
    assert [t.name for t in layout.tensors_of("ps-1")] == ["a", "b", "c"]
    assert layout.version == 3


def test_layout_is_deterministic_whatever_the_input_order():
    tensors = specs(7)
    first = balance(tensors, SERVERS, version=1)
    shuffled = list(tensors)
    random.Random(1).shuffle(shuffled)
    assert balance(tensors, SERVERS, version=1) == first
    assert balance(shuffled, SERVERS, version=1).assignment == first.assignment


def test_a_single_server_gets_everything():
    tensors = specs(3)
    layout = balance(tensors, ["ps-0"], version=1)
    assert set(layout.tensors_of("ps-0")) == set(tensors)
    assert layout.bytes_of("ps-0") == sum(t.nbytes for t in tensors)


def test_more_servers_than_tensors_leaves_some_servers_empty():
    tensors = [TensorSpec("a", torch.float32, (2,))]
    layout = balance(tensors, SERVERS, version=1)
    assert [len(layout.tensors_of(s)) for s in SERVERS] == [1, 0, 0]
    assert layout.tensors_of("ps-9") == () and layout.bytes_of("ps-9") == 0


def test_no_servers_is_invalid():
    with pytest.raises(InvalidArgument):
        balance(specs(), [], version=1)
