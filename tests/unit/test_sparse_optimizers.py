"""The sparse-aware optimizer builder applies exactly the torch mathematics a hand-written
single-process loop would: SGD and Adagrad as they are (equal to the dense update), Adam as
SparseAdam on the embedding table and Adam on the rest; one schedule drives them all."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lepton.errors import ConfigError
from lepton.optimizers import (
    CombinedOptimizer,
    build_lr_scheduler,
    build_optimizer,
    build_sparse_aware_optimizer,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch's sparse Adagrad

ROWS, DIM, CLASSES, USED = 50, 4, 3, 20  # batches draw ids below USED: rows USED.. are never touched
SPARSE = {"embedding.weight"}


class Bag(nn.Module):
    def __init__(self, sparse: bool = True) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(ROWS, DIM, mode="mean", sparse=sparse)
        self.classifier = nn.Linear(DIM, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(tokens))


def make_model(sparse: bool = True) -> Bag:
    torch.manual_seed(0)
    return Bag(sparse)


def batches(steps: int, low: int = 0, high: int = USED) -> Batches:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randint(low, high, (8, 5), generator=g), torch.randint(0, CLASSES, (8,), generator=g))
        for _ in range(steps)
    ]


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def train(
    model: nn.Module, opt: torch.optim.Optimizer | list[torch.optim.Optimizer], data: Batches
) -> dict[str, torch.Tensor]:
    opts = opt if isinstance(opt, list) else [opt]
    for x, y in data:
        for o in opts:
            o.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        for o in opts:
            o.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def by_builder(name: str, kwargs: dict) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: build_sparse_aware_optimizer(m.named_parameters(), SPARSE, name, 0.05, kwargs)


ByHand = Callable[[Bag], "torch.optim.Optimizer | list[torch.optim.Optimizer]"]


def adam_by_hand(cls: type[torch.optim.Optimizer], kwargs: dict) -> ByHand:
    """The dense optimizer on the classifier beside SparseAdam (same lr, betas, eps) on the table."""

    def build(m: Bag) -> list[torch.optim.Optimizer]:
        return [
            cls(m.classifier.parameters(), lr=0.05, **kwargs),
            torch.optim.SparseAdam([m.embedding.weight], lr=0.05, betas=kwargs["betas"], eps=kwargs["eps"]),
        ]

    return build


def torch_optimizer(cls: type[torch.optim.Optimizer], kwargs: dict) -> ByHand:
    return lambda m: cls(m.parameters(), lr=0.05, **kwargs)


NESTEROV = {"momentum": 0.9, "nesterov": True}
ADAM_ARGS = {"betas": (0.8, 0.95), "eps": 1e-6}  # not the defaults: SparseAdam must be given them
# case: (the job's optimizer name, its kwargs, the hand-written torch optimizers of the same job)
CASES = {
    "sgd": ("sgd", {"momentum": 0.9, "nesterov": True}, torch_optimizer(torch.optim.SGD, NESTEROV)),
    "sgd-plain": ("sgd", {}, torch_optimizer(torch.optim.SGD, {})),
    "adagrad": ("adagrad", {"lr_decay": 0.01}, torch_optimizer(torch.optim.Adagrad, {"lr_decay": 0.01})),
    "adam": ("adam", {"betas": [0.8, 0.95], "eps": 1e-6}, adam_by_hand(torch.optim.Adam, ADAM_ARGS)),
    "adamw": (
        "AdamW",
        {"betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1},
        adam_by_hand(torch.optim.AdamW, {**ADAM_ARGS, "weight_decay": 0.1}),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_builder_gives_the_parameters_of_hand_written_torch_optimizers(case):
    name, kwargs, by_hand = CASES[case]
    data = batches(6)
    model = make_model()
    built = train(model, by_builder(name, kwargs)(model), data)
    reference_model = make_model()
    assert_same(built, train(reference_model, by_hand(reference_model), data))
    assert not torch.equal(built["embedding.weight"][:USED], make_model().embedding.weight[:USED])


@pytest.mark.parametrize("case", ["sgd", "sgd-plain", "adagrad"])
def test_sgd_and_adagrad_on_sparse_gradients_equal_the_dense_update(case):
    name, kwargs, by_hand = CASES[case]
    data = batches(6)
    sparse_model, dense_model = make_model(sparse=True), make_model(sparse=False)
    built = train(sparse_model, by_builder(name, kwargs)(sparse_model), data)
    assert_same(built, train(dense_model, by_hand(dense_model), data))


@pytest.mark.parametrize("case", ["sgd", "adagrad", "adam", "adamw"])
def test_rows_no_batch_touches_never_change(case):
    name, kwargs, _ = CASES[case]
    model = make_model()
    before = model.embedding.weight.detach().clone()
    after = train(model, by_builder(name, kwargs)(model), batches(6))["embedding.weight"]
    assert torch.equal(after[USED:], before[USED:])


def test_adam_on_a_table_is_lazy_a_row_moves_only_in_steps_that_touch_it():
    model = make_model()
    opt = by_builder("adam", {})(model)
    train(model, opt, batches(3, 0, 10))  # rows 0..9 gain momentum
    before = model.embedding.weight.detach().clone()
    after = train(model, opt, batches(3, 10, 20))["embedding.weight"]  # dense Adam would keep moving 0..9
    assert torch.equal(after[:10], before[:10])
    assert not torch.equal(after[10:20], before[10:20])


def test_adam_with_a_table_is_sparse_adam_beside_adam_and_without_one_is_plain():
    model = make_model()
    combined = by_builder("adam", {})(model)
    assert isinstance(combined, CombinedOptimizer)
    assert [type(o) for o in combined.optimizers] == [torch.optim.Adam, torch.optim.SparseAdam]
    plain = build_sparse_aware_optimizer(model.named_parameters(), set(), "adam", 0.05, {})
    assert type(plain) is torch.optim.Adam
    table = [("embedding.weight", model.embedding.weight)]
    only_table = build_sparse_aware_optimizer(table, SPARSE, "adam", 0.05, {})
    assert type(only_table) is torch.optim.SparseAdam
    assert type(by_builder("sgd", {})(model)) is torch.optim.SGD


def test_one_schedule_drives_the_learning_rate_of_every_optimizer_combined():
    model = make_model()
    opt = by_builder("adam", {})(model)
    scheduler = build_lr_scheduler(opt, "step", {"step_size": 2, "gamma": 0.5})
    for x, y in batches(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        scheduler.step()
    assert [g["lr"] for o in opt.optimizers for g in o.param_groups] == [0.0125, 0.0125]


def test_a_restored_combined_optimizer_continues_exactly_as_the_uninterrupted_one():
    data = batches(6)
    model = make_model()
    opt = by_builder("adam", {})(model)
    scheduler = build_lr_scheduler(opt, "cosine", {"t_max": 6})
    for i, (x, y) in enumerate(data):
        if i == 3:
            # deep copies: a torch state_dict holds the live state tensors, which later steps change
            saved = copy.deepcopy((dict(model.named_parameters()), opt.state_dict(), scheduler.state_dict()))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        scheduler.step()
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}

    params, opt_state, scheduler_state = saved
    restored_model = make_model()
    restored_model.load_state_dict({n: p.detach() for n, p in params.items()})
    restored = by_builder("adam", {})(restored_model)
    restored_scheduler = build_lr_scheduler(restored, "cosine", {"t_max": 6})
    restored.load_state_dict(opt_state)
    restored_scheduler.load_state_dict(scheduler_state)
    for x, y in data[3:]:
        restored.zero_grad()
        nn.functional.cross_entropy(restored_model(x), y).backward()
        restored.step()
        restored_scheduler.step()
    assert_same({n: p.detach() for n, p in restored_model.named_parameters()}, uninterrupted)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("sgd", {"weight_decay": 0.01}, "weight_decay"),
        ("adagrad", {"weight_decay": 0.01}, "weight_decay"),
        ("sgd", {"fused": True}, "fused"),
        ("rmsprop", {}, "no sparse-gradient form"),
        ("sparseadam", {}, "no sparse-gradient form"),  # the dense classifier needs a dense optimizer
        ("adam", {"betas": [0.9, 1.5]}, "rejects"),
        ("adam", {"betas": [0.9]}, "rejects"),  # torch indexes betas[1]: an IndexError before
    ],
)
def test_combinations_torch_refuses_for_sparse_gradients_are_config_errors(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        by_builder(name, kwargs)(make_model())


def test_refused_combinations_stay_allowed_without_a_sparse_parameter():
    model = make_model(sparse=False)
    opt = build_sparse_aware_optimizer(model.named_parameters(), set(), "rmsprop", 0.05, {"weight_decay": 1})
    assert type(opt) is type(build_optimizer(model.parameters(), "rmsprop", 0.05, {}))


def test_a_sparse_name_that_is_not_a_parameter_is_refused():
    with pytest.raises(ConfigError, match="emb.weight"):
        build_sparse_aware_optimizer(make_model().named_parameters(), {"emb.weight"}, "sgd", 0.05, {})
