"""The parameter layout: every row of every parameter on exactly one server, contiguous row
slices, bytes balanced within one row, deterministic; slices put back together exactly."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest
import torch

from coordinator.layout import balance
from lepton.errors import InvalidArgument
from lepton.tensors import TensorSpec, assemble, part, row_slice


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


def row_bytes(t: TensorSpec) -> int:
    rows = t.shape[0] if t.shape else 1
    return t.nbytes // rows if rows else 0


SERVERS = ["ps-0", "ps-1", "ps-2"]


def rows_covered(layout, tensors):
    """parameter -> sorted [start, end) ranges from every server's share."""
    covered: dict[str, list[tuple[int, int]]] = {t.name: [] for t in tensors}
    for s in layout.servers:
        for t in layout.tensors_of(s):
            covered[t.of].append(t.rows if t.shape and t.shape[0] else (0, 0))
    return {name: sorted(ranges) for name, ranges in covered.items()}


@pytest.mark.parametrize("servers", range(1, 9))
@pytest.mark.parametrize("seed", range(4))
def test_every_row_is_placed_exactly_once_in_contiguous_slices(seed, servers):
    tensors = specs(seed)
    ids = [f"ps-{i}" for i in range(servers)]
    layout = balance(tensors, ids, version=1)
    by_name = {t.name: t for t in tensors}
    for name, ranges in rows_covered(layout, tensors).items():
        full = by_name[name]
        if len(ranges) == 1:
            continue  # whole
        assert ranges[0][0] == 0 and ranges[-1][1] == full.shape[0]
        assert all(a[1] == b[0] for a, b in pairwise(ranges)), ranges
    for t in layout.tensors:
        if t.is_slice:
            assert t.parameter_shape == by_name[t.parameter].shape
            assert t.shape[1:] == by_name[t.parameter].shape[1:] and t.dtype == by_name[t.parameter].dtype
    assert len({t.name for t in layout.tensors}) == len(layout.tensors)
    assert layout.servers == tuple(ids) and layout.version == 1
    assert sum(1 for t in tensors if any(s.is_slice and s.parameter == t.name for s in layout.tensors)) <= servers - 1


@pytest.mark.parametrize("servers", range(1, 9))
@pytest.mark.parametrize("seed", range(4))
def test_bytes_are_balanced_within_one_row(seed, servers):
    tensors = specs(seed)
    ids = [f"ps-{i}" for i in range(servers)]
    layout = balance(tensors, ids, version=1)
    loads = [layout.bytes_of(s) for s in ids]
    total = sum(t.nbytes for t in tensors)
    widest = max(row_bytes(t) for t in tensors)
    assert sum(loads) == total
    for load in loads:
        assert abs(load - total / servers) <= widest


def test_a_big_matrix_is_cut_into_equal_row_ranges():
    tensors = [TensorSpec("emb", torch.float32, (1_000_000, 16)), TensorSpec("bias", torch.float32, (4,))]
    layout = balance(tensors, SERVERS, version=2)
    emb = [t for t in layout.tensors if t.of == "emb"]
    assert [t.rows for t in emb] == [(0, 333_333), (333_333, 666_667), (666_667, 1_000_000)]
    assert [t.name for t in emb] == ["emb[0:333333]", "emb[333333:666667]", "emb[666667:1000000]"]
    assert [t.name for t in layout.tensors_of("ps-2")] == ["emb[666667:1000000]", "bias"]
    assert layout.version == 2


def test_parameters_that_fit_in_one_range_stay_whole():
    tensors = [TensorSpec(f"t{i}", torch.float32, (10,)) for i in range(6)]
    layout = balance(tensors, SERVERS, version=1)
    assert [layout.bytes_of(s) for s in SERVERS] == [80, 80, 80]
    assert [[t.name for t in layout.tensors_of(s)] for s in SERVERS] == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"]]
    assert not any(t.is_slice for t in layout.tensors)


def test_layout_is_deterministic():
    tensors = specs(7)
    assert balance(tensors, SERVERS, version=1) == balance(list(tensors), list(SERVERS), version=1)


def test_a_single_server_gets_everything_whole():
    tensors = specs(3)
    layout = balance(tensors, ["ps-0"], version=1)
    assert list(layout.tensors_of("ps-0")) == tensors
    assert layout.bytes_of("ps-0") == sum(t.nbytes for t in tensors)


def test_more_servers_than_rows_leaves_some_servers_empty():
    tensors = [TensorSpec("a", torch.float32, ())]
    layout = balance(tensors, SERVERS, version=1)
    assert [len(layout.tensors_of(s)) for s in SERVERS] == [0, 1, 0]
    assert layout.tensors_of("ps-9") == () and layout.bytes_of("ps-9") == 0


def test_no_servers_is_invalid():
    with pytest.raises(InvalidArgument):
        balance(specs(), [], version=1)


@pytest.mark.parametrize("servers", [1, 2, 3, 5, 8])
def test_slices_reassemble_to_the_parameters(servers):
    g = torch.Generator().manual_seed(servers)
    params = {
        "w": torch.randn(7, 5, generator=g),
        "b": torch.randn(5, generator=g),
        "s": torch.randn((), generator=g),
        "e": torch.randn(11, 3, 2, generator=g),
    }
    tensors = [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in params.items()]
    layout = balance(tensors, [f"ps-{i}" for i in range(servers)], version=1)
    pieces = {t.name: part(params, t).clone() for t in layout.tensors}
    for t in layout.tensors:
        assert tuple(pieces[t.name].shape) == t.shape
    back = assemble(layout.tensors, pieces)
    assert set(back) == set(params)
    for n, v in params.items():
        assert torch.equal(back[n], v)


def test_assemble_refuses_gaps_and_overlaps():
    full = TensorSpec("w", torch.float32, (6, 2))
    values = torch.arange(12.0).reshape(6, 2)
    a, b = row_slice(full, 0, 3), row_slice(full, 3, 6)
    gap = row_slice(full, 4, 6)
    pieces = {s.name: part({"w": values}, s) for s in (a, b, gap)}
    assert torch.equal(assemble([b, a], pieces)["w"], values)
    with pytest.raises(InvalidArgument):
        assemble([a, gap], pieces)
    with pytest.raises(InvalidArgument):
        assemble([a], pieces)
    assert row_slice(full, 0, 6) == full
