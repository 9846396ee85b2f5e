"""The synthetic data sets are fixed functions of their recipe: same bytes in every process, the
documented shapes, exact class balance, and a test split that shares no sample with training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lepton import workloads
from lepton.errors import ConfigError
from lepton.workloads import SYNTHETIC_IMAGE, GaussianMixture, Workload, build_model, load_workload

# Small enough to build in milliseconds; chunk_rows below n_train so blocks are exercised.
SMALL = GaussianMixture(n_train=203, n_test=47, features=24, classes=5, latent_dim=4, chunk_rows=64)


def tensors(workload: Workload) -> list[torch.Tensor]:
    return [*workload.train.tensors, *workload.test.tensors]  # type: ignore[attr-defined]


def test_generating_twice_gives_identical_tensors():
    first, second = SMALL.generate(), SMALL.generate()
    assert all(torch.equal(a, b) for a, b in zip(tensors(first), tensors(second)))


def test_data_does_not_depend_on_the_number_of_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = SMALL.generate()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(tensors(single), tensors(SMALL.generate())))


def test_test_split_does_not_depend_on_the_training_size():
    longer = GaussianMixture(**{**SMALL.__dict__, "n_train": 400})
    test_x = longer.generate().test.tensors[0]  # type: ignore[attr-defined]
    assert torch.equal(test_x, SMALL.generate().test.tensors[0])  # type: ignore[attr-defined]


def test_small_instance_has_the_documented_shapes_dtypes_and_balance():
    w = SMALL.generate()
    x, y = w.train.tensors  # type: ignore[attr-defined]
    xt, yt = w.test.tensors  # type: ignore[attr-defined]
    assert (w.input_dim, w.num_classes) == (24, 5)
    assert x.shape == (203, 24) and xt.shape == (47, 24)
    assert x.dtype == xt.dtype == torch.float32
    assert y.dtype == yt.dtype == torch.int64
    # n // classes of each, the first n % classes classes one more
    assert torch.bincount(y, minlength=5).tolist() == [41, 41, 41, 40, 40]
    assert torch.bincount(yt, minlength=5).tolist() == [10, 10, 9, 9, 9]
    assert torch.isfinite(x).all() and torch.isfinite(xt).all()


def test_train_and_test_share_no_sample():
    w = SMALL.generate()
    x, xt = w.train.tensors[0], w.test.tensors[0]  # type: ignore[attr-defined]
    assert not (x[:, None, :] == xt[None, :, :]).all(dim=2).any()
    assert len(torch.unique(torch.cat([x, xt]), dim=0)) == len(x) + len(xt)


def test_labels_carry_signal_in_the_features():
    # class means of the features differ by much more than their sampling error
    w = SMALL.generate()
    x, y = w.train.tensors  # type: ignore[attr-defined]
    means = torch.stack([x[y == c].mean(dim=0) for c in range(5)])
    assert torch.cdist(means, means).max() > 1.0


def test_the_job_seed_does_not_change_the_built_in_data(monkeypatch):
    monkeypatch.setattr(workloads, "SYNTHETIC_IMAGE", SMALL)
    a, b = load_workload("synthetic-image", seed=0), load_workload("synthetic-image", seed=99)
    assert all(torch.equal(p, q) for p, q in zip(tensors(a), tensors(b)))


def test_a_recipe_with_a_size_below_one_is_refused():
    with pytest.raises(ConfigError, match="classes"):
        GaussianMixture(n_train=10, n_test=10, features=4, classes=0)


def test_synthetic_image_recipe_is_100k_by_1000_in_10_classes():
    assert SYNTHETIC_IMAGE.n_train + SYNTHETIC_IMAGE.n_test == 100_000
    assert (SYNTHETIC_IMAGE.n_train, SYNTHETIC_IMAGE.n_test) == (90_000, 10_000)
    assert (SYNTHETIC_IMAGE.features, SYNTHETIC_IMAGE.classes) == (1_000, 10)


def test_synthetic_image_materialises_with_the_documented_shapes_and_the_mlp_fits_it():
    w = load_workload("synthetic-image", seed=0)  # the one full build in this file (about 1 s)
    x, y = w.train.tensors  # type: ignore[attr-defined]
    xt, yt = w.test.tensors  # type: ignore[attr-defined]
    assert x.shape == (90_000, 1_000) and x.dtype == torch.float32
    assert xt.shape == (10_000, 1_000) and xt.dtype == torch.float32
    assert torch.bincount(y).tolist() == [9_000] * 10
    assert torch.bincount(yt).tolist() == [1_000] * 10
    model = build_model("mlp", w, seed=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1_000, 64), (64, 10)]
