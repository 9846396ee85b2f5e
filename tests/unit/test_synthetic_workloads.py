"""The synthetic data sets are fixed functions of their recipe: same bytes in every process, the
documented shapes, exact class balance, and a test split that shares no sample with training;
synthetic-text also has a long tail, informative topic tokens and a sparse-embedding model."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lepton.errors import ConfigError
from lepton.workloads import (
    SYNTHETIC_IMAGE,
    SYNTHETIC_TEXT,
    GaussianMixture,
    TopicCorpus,
    Workload,
    build_model,
    load_workload,
    outline_workload,
    sparse_parameter_names,
    take,
)
from lepton.workloads import synthetic as workloads

# Small enough to build in milliseconds; chunk_rows below n_train so blocks are exercised.
SMALL = GaussianMixture(n_train=203, n_test=47, features=24, classes=5, latent_dim=4, chunk_rows=64)


def tensors(workload: Workload) -> list[torch.Tensor]:
    return [*workload.train.tensors, *workload.test.tensors]  # type: ignore[attr-defined]


def test_generating_twice_gives_identical_tensors():
    first, second = SMALL.generate(), SMALL.generate()
    assert all(torch.equal(a, b) for a, b in zip(tensors(first), tensors(second), strict=True))


def test_data_does_not_depend_on_the_number_of_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = SMALL.generate()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(tensors(single), tensors(SMALL.generate()), strict=True))


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
    assert all(torch.equal(p, q) for p, q in zip(tensors(a), tensors(b), strict=True))


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


# --- synthetic-text -------------------------------------------------------------------------------

SMALL_TEXT = TopicCorpus(
    n_train=301, n_test=59, doc_len=20, classes=4, vocab=500, topic_tokens=30, topic_prob=0.3, chunk_rows=64
)


@functools.cache
def synthetic_text() -> Workload:
    """The full built-in set, built once per process (about a second)."""
    return load_workload("synthetic-text", seed=0)


def test_text_generating_twice_gives_identical_tensors():
    first, second = SMALL_TEXT.generate(), SMALL_TEXT.generate()
    assert all(torch.equal(a, b) for a, b in zip(tensors(first), tensors(second), strict=True))


def test_text_does_not_depend_on_the_number_of_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = SMALL_TEXT.generate()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(tensors(single), tensors(SMALL_TEXT.generate()), strict=True))


def test_text_test_split_does_not_depend_on_the_training_size():
    longer = TopicCorpus(**{**SMALL_TEXT.__dict__, "n_train": 700})
    test_x = longer.generate().test.tensors[0]  # type: ignore[attr-defined]
    assert torch.equal(test_x, SMALL_TEXT.generate().test.tensors[0])  # type: ignore[attr-defined]


def test_the_job_seed_does_not_change_the_built_in_text(monkeypatch):
    monkeypatch.setattr(workloads, "SYNTHETIC_TEXT", SMALL_TEXT)
    a, b = load_workload("synthetic-text", seed=0), load_workload("synthetic-text", seed=99)
    assert all(torch.equal(p, q) for p, q in zip(tensors(a), tensors(b), strict=True))


def test_a_text_recipe_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="topic_prob"):
        TopicCorpus(n_train=10, n_test=10, doc_len=5, classes=2, vocab=100, topic_tokens=5, topic_prob=1.5)
    with pytest.raises(ConfigError, match="disjoint"):
        TopicCorpus(n_train=10, n_test=10, doc_len=5, classes=3, vocab=10, topic_tokens=4)


def test_the_generators_distributions_are_normalised_and_topics_are_disjoint():
    b, t = SMALL_TEXT.token_probabilities()
    assert torch.allclose(b.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(t.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert (b > 0).all()  # every id can occur
    assert ((t > 0).sum(dim=0) <= 1).all() and ((t > 0).sum(dim=1) == 30).all()


def test_the_bayes_classifier_of_the_small_recipe_is_far_above_chance():
    w = SMALL_TEXT.generate()
    xt, yt = w.test.tensors  # type: ignore[attr-defined]
    assert (SMALL_TEXT.log_likelihoods(xt).argmax(dim=1) == yt).float().mean() > 0.8


def test_synthetic_text_recipe_is_100k_documents_of_100_ids_in_10_classes():
    assert (SYNTHETIC_TEXT.n_train, SYNTHETIC_TEXT.n_test) == (90_000, 10_000)
    assert (SYNTHETIC_TEXT.doc_len, SYNTHETIC_TEXT.classes) == (100, 10)
    assert SYNTHETIC_TEXT.vocab >= 100_000


def test_synthetic_text_has_the_documented_shapes_dtypes_bounds_and_balance():
    w = synthetic_text()
    x, y = w.train.tensors  # type: ignore[attr-defined]
    xt, yt = w.test.tensors  # type: ignore[attr-defined]
    assert (w.input_dim, w.num_classes, w.vocab_size) == (100, 10, 100_000)
    assert x.shape == (90_000, 100) and xt.shape == (10_000, 100)
    assert x.dtype == xt.dtype == y.dtype == yt.dtype == torch.int64
    assert int(torch.cat([x, xt]).min()) >= 0 and int(torch.cat([x, xt]).max()) < 100_000
    assert torch.bincount(y).tolist() == [9_000] * 10
    assert torch.bincount(yt).tolist() == [1_000] * 10
    bx, by = take(w.train, torch.tensor([5, 0, 7]))
    assert torch.equal(bx, x[[5, 0, 7]]) and torch.equal(by, y[[5, 0, 7]])


def test_synthetic_text_frequencies_have_a_long_tail():
    x = synthetic_text().train.tensors[0]  # type: ignore[attr-defined]
    counts = torch.bincount(x.flatten(), minlength=100_000)
    median = float(counts.median())
    assert median >= 1
    assert float(counts.max()) > 1_000 * median  # the head: rank 1 alone is about 6% of all tokens
    assert (counts > 0).sum() > 95_000  # the tail: nearly every id occurs somewhere


def test_synthetic_text_topic_tokens_spread_over_the_table_and_into_the_rare_ids():
    b, t = SYNTHETIC_TEXT.token_probabilities()
    topic_ids = (t > 0).any(dim=0).nonzero().flatten()
    assert len(topic_ids) == 10 * SYNTHETIC_TEXT.topic_tokens
    # every tenth of the table holds topic ids, and most topic ids are rarer than the median id
    assert torch.bincount(topic_ids * 10 // 100_000, minlength=10).min() > 0
    assert (b[topic_ids] < b.median()).float().mean() > 0.4


def test_synthetic_text_labels_are_predictable_from_token_counts():
    # naive Bayes from training counts (add-one smoothing), scored on the test split
    w = synthetic_text()
    x, y = w.train.tensors  # type: ignore[attr-defined]
    xt, yt = w.test.tensors  # type: ignore[attr-defined]
    counts = torch.bincount((y[:, None] * 100_000 + x).flatten(), minlength=10 * 100_000).view(10, 100_000)
    log_p = torch.log((counts + 1.0) / (counts.sum(dim=1, keepdim=True) + 100_000.0))
    scores = torch.stack([log_p[c][xt].sum(dim=1) for c in range(10)], dim=1)
    accuracy = float((scores.argmax(dim=1) == yt).float().mean())
    assert accuracy > 0.6  # chance is 0.1
    bayes = SYNTHETIC_TEXT.log_likelihoods(xt[:2_000]).argmax(dim=1)
    assert (bayes == yt[:2_000]).float().mean() > accuracy - 0.05  # and the generator's own beats it


def test_embedding_bag_has_stable_names_and_a_row_sparse_embedding_gradient():
    w = SMALL_TEXT.generate()
    model = build_model("embedding-bag", w, seed=0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {"embedding.weight": (500, 32), "classifier.weight": (4, 32), "classifier.bias": (4,)}
    assert sparse_parameter_names(model) == {"embedding.weight"}
    x, y = take(w.train, torch.arange(8))
    logits = model(x)
    assert logits.shape == (8, 4)
    nn.functional.cross_entropy(logits, y).backward()
    grad = model.embedding.weight.grad.coalesce()
    assert grad.is_sparse and not model.classifier.weight.grad.is_sparse
    assert set(grad.indices()[0].tolist()) == set(x.flatten().tolist())  # exactly the rows used
    again = build_model("embedding-bag", w, seed=0)
    assert torch.equal(again.embedding.weight, model.embedding.weight.detach())


def test_embedding_bag_on_data_without_a_vocabulary_is_refused():
    with pytest.raises(ConfigError, match="token ids"):
        build_model("embedding-bag", SMALL.generate(), seed=0)


def test_an_outline_holds_the_first_block_of_each_split_exactly_as_generated():
    mixture = GaussianMixture(n_train=700, n_test=300, features=12, classes=3, chunk_rows=256)
    whole, outline = mixture.generate(), mixture.outline()
    for full, head in ((whole.train, outline.train), (whole.test, outline.test)):
        assert len(head) == 256
        assert torch.equal(head.tensors[0], full.tensors[0][:256])
        assert torch.equal(head.tensors[1], full.tensors[1][:256])
    assert (outline.input_dim, outline.num_classes) == (whole.input_dim, whole.num_classes)


def test_the_coordinator_outlines_synthetic_image_and_loads_other_sets_whole():
    workload, samples = outline_workload("synthetic-image", 0)
    assert samples == SYNTHETIC_IMAGE.n_train and len(workload.train) == SYNTHETIC_IMAGE.chunk_rows
    digits, samples = outline_workload("digits", 0)
    assert samples == len(digits.train) == len(load_workload("digits", 0).train)
