"""The synthetic data sets: recipes that are fixed functions of their fields (the same bytes in
every process, whatever the job's seed), and the two built-in ones, synthetic-image and
synthetic-text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from lepton.errors import ConfigError
from lepton.workloads.workload import Workload


@dataclass(frozen=True)
class GaussianMixture:
    """The recipe of a synthetic classification set: clusters in a small latent space, projected
    into many features, plus noise. Every number that shapes the data is a field here.

    Generation, for each split (train, then test, each from its own stream):

    1. Labels: exactly ``n // classes`` samples of every class (the first ``n % classes`` classes
       get one more), in a random order.
    2. Latent points: each class owns ``clusters_per_class`` centres drawn once from
       ``N(0, centre_scale**2 * I)`` in ``latent_dim`` dimensions; a sample picks one of its class's
       centres uniformly and adds ``N(0, latent_std**2 * I)``. Several centres per class make the
       classes non-convex, so a linear model falls well short of the MLP.
    3. Features: the latent point times one fixed ``latent_dim x features`` Gaussian matrix with
       entries ``N(0, 1/latent_dim)``, plus ``N(0, noise_std**2)`` on every feature. Only a
       ``latent_dim``-dimensional subspace carries signal; the rest is noise a model must learn
       to ignore.

    The centres and projection come from ``seed``; the train and test splits from ``seed + 1`` and
    ``seed + 2`` (so the test split does not depend on ``n_train``). Samples are drawn in blocks
    of ``chunk_rows`` rows straight into the preallocated feature matrix, so peak memory is the
    float32 matrix itself. The result depends only on these fields (and the torch build), never on
    the job's seed.

    Raises:
        ConfigError: from ``__post_init__`` when a size or a spread is out of range.
    """

    n_train: int
    n_test: int
    features: int
    classes: int
    latent_dim: int = 16
    clusters_per_class: int = 4
    centre_scale: float = 1.15
    latent_std: float = 1.0
    noise_std: float = 1.0
    seed: int = 1
    chunk_rows: int = 8192

    def __post_init__(self) -> None:
        sizes = ("n_train", "n_test", "features", "classes", "latent_dim", "clusters_per_class", "chunk_rows")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ConfigError(f"GaussianMixture.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("centre_scale", "latent_std", "noise_std"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"GaussianMixture.{name} must be >= 0, got {getattr(self, name)}")

    def generate(self, rows: int | None = None) -> Workload:
        """Both splits as float32 features and int64 labels (``rows``: only the first ``rows`` of
        each split, the same values)."""
        structure = torch.Generator().manual_seed(self.seed)
        centres = self.centre_scale * torch.randn(
            self.classes, self.clusters_per_class, self.latent_dim, generator=structure
        )
        projection = torch.randn(self.latent_dim, self.features, generator=structure) / self.latent_dim**0.5
        train = self._split(self.n_train, centres, projection, torch.Generator().manual_seed(self.seed + 1), rows)
        test = self._split(self.n_test, centres, projection, torch.Generator().manual_seed(self.seed + 2), rows)
        return Workload(train, test, self.features, self.classes)

    def outline(self) -> Workload:
        """What a coordinator needs of the set without drawing all of it: the first block
        (``chunk_rows``) of each split's rows, the same values ``generate`` gives them, with every
        other fact of the set; the training split's length is ``n_train``, not the outline's."""
        return self.generate(rows=self.chunk_rows)

    def _split(
        self, n: int, centres: torch.Tensor, projection: torch.Tensor, generator: torch.Generator,
        rows: int | None = None,
    ) -> TensorDataset:
        """The split's n samples, or (``rows``) its first ``rows``, the same values."""
        y = (torch.arange(n) % self.classes)[torch.randperm(n, generator=generator)]
        cluster = torch.randint(0, self.clusters_per_class, (n,), generator=generator)
        n = n if rows is None else min(n, rows)
        y = y[:n]
        x = torch.empty(n, self.features, dtype=torch.float32)
        for lo in range(0, n, self.chunk_rows):
            hi = min(n, lo + self.chunk_rows)
            latent = centres[y[lo:hi], cluster[lo:hi]]
            latent += self.latent_std * torch.randn(hi - lo, self.latent_dim, generator=generator)
            block = x[lo:hi]
            block.normal_(0.0, self.noise_std, generator=generator)
            block.addmm_(latent, projection)
        return TensorDataset(x, y)


# 100,000 samples of 1,000 features, 10 classes: 90,000 train, 10,000 test. On the test split the
# MLP 1000-64-10 (Adam, lr 1e-3, batch 128, 3 epochs) reaches about 0.90, a linear model about
# 0.47, and the Bayes-optimal classifier (it knows the centres and the projection) 0.949.
SYNTHETIC_IMAGE = GaussianMixture(n_train=90_000, n_test=10_000, features=1_000, classes=10)


def _synthetic_image(seed: int = 0) -> Workload:
    """``SYNTHETIC_IMAGE``: image-sized vectors (no spatial structure), identical in every process
    whatever the job's seed; about 1 s and 400 MB to build."""
    return SYNTHETIC_IMAGE.generate()


@dataclass(frozen=True)
class TopicCorpus:
    """The recipe of a synthetic text-classification set: documents of token ids from a long-tailed
    background vocabulary, salted with the tokens of their class's topic. Every number that shapes
    the data is a field here.

    Structure (drawn once from ``seed``):

    1. Background: token ranks ``r = 1 .. vocab`` have Zipf-like frequencies: ``p(r)`` is the
       mass that a continuous power law with density ``∝ x ** -zipf_s`` on ``[1, vocab + 1)``
       puts in ``[r, r + 1)``, so ``p(r) ≈ c * r ** -zipf_s`` (with ``zipf_s = 1`` and 100,000
       ids, rank 1 is about 6% of all tokens and the median id about one token in 500,000).
       Rank ``r`` is token id ``perm[r - 1]`` for one fixed random permutation, so the frequent
       ids are scattered over the table (any contiguous row range gets its share of hot rows).
    2. Topics: each class owns ``topic_tokens`` ids, the classes' sets disjoint and drawn
       uniformly from the whole vocabulary (so most topic ids are rare in the background and
       they reach every part of the table). Within a topic, its ``j``-th id has the same
       power-law probability with exponent ``topic_zipf_s``: a few topic ids are common, most
       appear in few documents, so a model must learn many rarely seen embedding rows.

    Generation, for each split (train, then test, each from its own stream):

    1. Labels: exactly ``n // classes`` documents of every class (the first ``n % classes``
       classes get one more), in a random order.
    2. Tokens: each of a document's ``doc_len`` positions independently is, with probability
       ``topic_prob``, an id from its class's topic, else an id from the background. Every token
       of every document is one of ``vocab`` ids in ``[0, vocab)``, stored as int64.

    A document is therefore a bag of words from the mixture ``topic_prob * T_c + (1 - topic_prob)
    * B`` (``token_probabilities`` gives ``B`` and ``T``), and ``log_likelihoods`` gives the
    Bayes-optimal classifier. The train and test splits come from ``seed + 1`` and ``seed + 2``
    (so the test split does not depend on ``n_train``); ranks are drawn by inverting the power
    law's CDF in closed form, in blocks of ``chunk_rows`` documents, so peak memory is the int64
    token matrix plus a few blocks. The result depends only on these fields (and the torch
    build), never on the job's seed.

    Raises:
        ConfigError: from ``__post_init__`` when a size or a probability is out of range.
    """

    n_train: int
    n_test: int
    doc_len: int
    classes: int
    vocab: int
    topic_tokens: int = 2_000
    topic_prob: float = 0.04
    zipf_s: float = 1.0
    topic_zipf_s: float = 1.0
    seed: int = 3
    chunk_rows: int = 8192

    def __post_init__(self) -> None:
        sizes = ("n_train", "n_test", "doc_len", "classes", "vocab", "topic_tokens", "chunk_rows")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ConfigError(f"TopicCorpus.{name} must be >= 1, got {getattr(self, name)}")
        if self.classes * self.topic_tokens > self.vocab:
            raise ConfigError(
                f"TopicCorpus needs classes * topic_tokens <= vocab (disjoint topics), got "
                f"{self.classes} * {self.topic_tokens} > {self.vocab}"
            )
        if not 0.0 <= self.topic_prob <= 1.0:
            raise ConfigError(f"TopicCorpus.topic_prob must be in [0, 1], got {self.topic_prob}")
        for name in ("zipf_s", "topic_zipf_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"TopicCorpus.{name} must be >= 0, got {getattr(self, name)}")

    def generate(self) -> Workload:
        """Both splits as int64 token ids ``[n, doc_len]`` and int64 labels."""
        background, topics = self._structure()
        train = self._split(self.n_train, background, topics, torch.Generator().manual_seed(self.seed + 1))
        test = self._split(self.n_test, background, topics, torch.Generator().manual_seed(self.seed + 2))
        return Workload(train, test, self.doc_len, self.classes, vocab_size=self.vocab)

    def token_probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The background distribution ``B`` over ids, shape ``[vocab]``, and the topic
        distributions ``T``, shape ``[classes, vocab]`` (float64, each row summing to 1)."""
        background, topics = self._structure()
        b = torch.zeros(self.vocab, dtype=torch.float64)
        b[background] = self._pmf(self.vocab, self.zipf_s)
        t = torch.zeros(self.classes, self.vocab, dtype=torch.float64)
        t.scatter_(1, topics, self._pmf(self.topic_tokens, self.topic_zipf_s).expand(self.classes, -1))
        return b, t

    def log_likelihoods(self, tokens: torch.Tensor) -> torch.Tensor:
        """``log P(document | class)`` under the generator, shape ``[n, classes]``: its argmax is
        the Bayes-optimal prediction (the classes are equally likely)."""
        b, t = self.token_probabilities()
        per_token = torch.log(self.topic_prob * t + (1.0 - self.topic_prob) * b)  # [classes, vocab]
        out = torch.empty(len(tokens), self.classes, dtype=torch.float64)
        for lo in range(0, len(tokens), self.chunk_rows):
            block = tokens[lo : lo + self.chunk_rows]
            out[lo : lo + len(block)] = per_token[:, block].sum(dim=2).T
        return out

    def _structure(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        background = torch.randperm(self.vocab, generator=generator)  # rank -> id
        chosen = torch.randperm(self.vocab, generator=generator)[: self.classes * self.topic_tokens]
        return background, chosen.view(self.classes, self.topic_tokens)

    @staticmethod
    def _pmf(n: int, s: float) -> torch.Tensor:
        """P(rank = r), r = 1 .. n, of ``_ranks``: the mass of a continuous power law with density
        ``∝ x ** -s`` on ``[1, n + 1)`` that falls in ``[r, r + 1)``."""
        r = torch.arange(1, n + 2, dtype=torch.float64)
        cum = torch.log(r) if s == 1.0 else r ** (1.0 - s)
        return (cum[1:] - cum[:-1]) / (cum[-1] - cum[0])

    @staticmethod
    def _ranks(u: torch.Tensor, n: int, s: float) -> torch.Tensor:
        """Zero-based ranks in ``[0, n)`` of uniforms ``u`` in [0, 1) (overwritten), by inverting
        the continuous power law's CDF in closed form (searching a 100,000-entry table is ten
        times slower)."""
        if s == 1.0:
            x = u.mul_(math.log(n + 1)).exp_()
        else:
            x = u.mul_((n + 1) ** (1.0 - s) - 1.0).add_(1.0).pow_(1.0 / (1.0 - s))
        return x.floor_().clamp_(1, n).long().sub_(1)

    def _split(
        self, n: int, background: torch.Tensor, topics: torch.Tensor, generator: torch.Generator
    ) -> TensorDataset:
        y = (torch.arange(n) % self.classes)[torch.randperm(n, generator=generator)]
        x = torch.empty(n, self.doc_len, dtype=torch.int64)
        for lo in range(0, n, self.chunk_rows):
            hi = min(n, lo + self.chunk_rows)
            shape = (hi - lo, self.doc_len)
            # One float32 uniform v per position: v < topic_prob picks the topic, and then
            # v / topic_prob is uniform on [0, 1) and picks the topic's id.
            v = torch.rand(shape, generator=generator)
            from_topic = v < self.topic_prob
            topic_u = (v / max(self.topic_prob, 1e-300)).clamp_(max=1.0)  # above 1: unused
            j = self._ranks(topic_u, self.topic_tokens, self.topic_zipf_s)
            u = torch.rand(shape, generator=generator, dtype=torch.float64)
            rank = self._ranks(u, self.vocab, self.zipf_s)
            x[lo:hi] = torch.where(from_topic, topics[y[lo:hi, None], j], background[rank])
        return TensorDataset(x, y)


# 100,000 documents of 100 token ids, 10 classes, 100,000 ids: 90,000 train, 10,000 test; about
# 4 topic tokens per document. On the test split the Bayes-optimal classifier reaches 0.957, naive
# Bayes on the training counts 0.900, and embedding-bag (dim 32, mean; Adam lr 0.01 with SparseAdam
# on the table, batch 128, 3 epochs: bench/reference.py) 0.897-0.900; built in about 0.5 s.
SYNTHETIC_TEXT = TopicCorpus(n_train=90_000, n_test=10_000, doc_len=100, classes=10, vocab=100_000)


def _synthetic_text(seed: int = 0) -> Workload:
    """``SYNTHETIC_TEXT``: bags of token ids, identical in every process whatever the job's seed;
    80 MB of int64."""
    return SYNTHETIC_TEXT.generate()
