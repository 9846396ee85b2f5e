"""Built-in datasets and models, user factories (``package.module:factory``), batching and
evaluation. Pure torch: the worker and coordinator both build the same model from the same seed."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lepton.errors import ConfigError
from lepton.factories import absolute_factory, is_file_factory  # noqa: F401 - absolute_factory re-exported
from lepton.tensors import TensorKind
from lepton.tasks import (
    CLASSIFICATION,
    REGRESSION,
    ClassificationMetrics,
    ClassificationTally,
    Evaluation,
    LossFn,
    MultiLabelRecall,
    RegressionMetrics,
    RegressionTally,
    resolve_loss,
    shape_target,
)

SPLIT_SEED = 0  # the train/test split of built-in datasets never depends on the job's seed
# A factory with this attribute set to True receives every fact Lepton offers it (a model:
# input_dim, output_dim, num_classes for class ids, vocab_size for token ids; a dataset: seed)
# even through **kwargs; without it, only those its signature names explicitly.
ALL_FACTS_ATTRIBUTE = "lepton_all_facts"

log = structlog.get_logger("lepton.workloads")


@dataclass(frozen=True)
class Workload:
    """A dataset pair and the facts a model factory needs. ``input_dim`` is the number of values in
    one sample (features, or token ids per document); ``num_classes`` the number of class ids of
    integer labels (0 for real-valued targets); ``vocab_size`` is set for token-id data: the ids
    lie in ``[0, vocab_size)``; ``target_dim`` is the number of values in one label (1 for a
    scalar label)."""

    train: Dataset
    test: Dataset
    input_dim: int
    num_classes: int
    vocab_size: int | None = None
    target_dim: int = 1

    @property
    def label_dtype(self) -> torch.dtype:
        return take(self.train, torch.arange(1))[1].dtype

    def output_dim(self, task: str, loss: str) -> int:
        """The model's output width: one logit per class for a classification loss on class ids,
        else one value per target value (``bce_with_logits``: one logit per label)."""
        if task == CLASSIFICATION and loss != "bce_with_logits" and self.num_classes > 0:
            return self.num_classes
        return self.target_dim


def _digits(seed: int = 0) -> Workload:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download); a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = int(len(y) * 0.8)
    tr, te = perm[:n_train], perm[n_train:]
    return Workload(TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te]), 64, 10)


def _diabetes(seed: int = 0) -> Workload:
    """scikit-learn's bundled diabetes regression set (442 patients, 10 features, target: disease
    progression after one year, 25-346; no download); a fixed 80/20 split (353/89). Features and
    target are standardised with the training split's mean and standard deviation, so MSE and MAE
    are in units of the training target's standard deviation (76.16 progression points; MSE in its
    square) and an MSE of 1 is about as good as predicting the mean."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = int(len(y) * 0.8)
    tr, te = perm[:n_train], perm[n_train:]
    x = (x - x[tr].mean(0)) / x[tr].std(0)
    y = (y - y[tr].mean()) / y[tr].std()
    return Workload(TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te]), 10, 0)


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

    def generate(self) -> Workload:
        """Both splits as float32 features and int64 labels."""
        structure = torch.Generator().manual_seed(self.seed)
        centres = self.centre_scale * torch.randn(
            self.classes, self.clusters_per_class, self.latent_dim, generator=structure
        )
        projection = torch.randn(self.latent_dim, self.features, generator=structure) / self.latent_dim**0.5
        train = self._split(self.n_train, centres, projection, torch.Generator().manual_seed(self.seed + 1))
        test = self._split(self.n_test, centres, projection, torch.Generator().manual_seed(self.seed + 2))
        return Workload(train, test, self.features, self.classes)

    def _split(
        self, n: int, centres: torch.Tensor, projection: torch.Tensor, generator: torch.Generator
    ) -> TensorDataset:
        y = (torch.arange(n) % self.classes)[torch.randperm(n, generator=generator)]
        cluster = torch.randint(0, self.clusters_per_class, (n,), generator=generator)
        x = torch.empty(n, self.features, dtype=torch.float32)
        for lo in range(0, n, self.chunk_rows):
            hi = min(n, lo + self.chunk_rows)
            latent = centres[y[lo:hi], cluster[lo:hi]]
            latent += self.latent_std * torch.randn(hi - lo, self.latent_dim, generator=generator)
            rows = x[lo:hi]
            rows.normal_(0.0, self.noise_std, generator=generator)
            rows.addmm_(latent, projection)
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


DATASETS: dict[str, Callable[..., Workload]] = {
    "digits": _digits,
    "diabetes": _diabetes,
    "synthetic-image": _synthetic_image,
    "synthetic-text": _synthetic_text,
}


def _mlp(input_dim: int, output_dim: int, hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, output_dim))


class EmbeddingBagClassifier(nn.Module):
    """Mean of the documents' token embeddings, then a linear layer. The embedding table is
    ``embedding.weight`` (``vocab_size x dim``) and gets row-sparse gradients: a batch touches
    only the rows of the ids it contains."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 32) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, dim, mode="mean", sparse=True)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, classes]`` of int64 token ids ``[n, doc_len]`` (one bag per row)."""
        return self.classifier(self.embedding(tokens))

    def rows_touched(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The embedding rows a batch reads (and so the only rows its gradient touches), sorted:
        what a Lepton worker pulls before computing the batch. Every model with sparse parameters
        provides this."""
        return {"embedding.weight": torch.unique(tokens)}


def _embedding_bag(num_classes: int, vocab_size: int | None = None, dim: int = 32) -> nn.Module:
    if vocab_size is None:
        raise ConfigError("model embedding-bag needs a data set of token ids (e.g. synthetic-text)")
    return EmbeddingBagClassifier(vocab_size, num_classes, dim)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "embedding-bag": _embedding_bag}


def sparse_parameter_names(model: nn.Module) -> frozenset[str]:
    """Names of the parameters whose gradients are row-sparse: the weights of ``nn.Embedding`` and
    ``nn.EmbeddingBag`` modules built with ``sparse=True``."""
    return frozenset(
        f"{prefix}.weight" if prefix else "weight"
        for prefix, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse
    )


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model that Lepton carries, by ``state_dict`` name, in the model's order:
    its parameters (each shared one once, under its first name) and its persistent buffers. Live
    tensors, not copies: a worker installs pulled values into them."""
    out: dict[str, torch.Tensor] = dict(model.named_parameters())
    persistent = set(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers():
        if name in persistent and buffer is not None:
            out[name] = buffer
    return out


def tensor_kinds(model: nn.Module) -> dict[str, TensorKind]:
    """What each tensor of ``model_tensors`` is: a trainable or frozen parameter, or a buffer."""
    params = dict(model.named_parameters())
    return {
        name: (TensorKind.PARAMETER if params[name].requires_grad else TensorKind.FROZEN)
        if name in params
        else TensorKind.BUFFER
        for name in model_tensors(model)
    }


def tied_names(model: nn.Module) -> dict[str, str]:
    """``state_dict`` names that are another name's tensor (tied weights), mapped to the name
    ``model_tensors`` carries it under; an export writes the tensor under both."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor is None:
            continue
        key = id(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _import_file(path_text: str, spec: str) -> Any:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"no file {path} for {spec!r}")
    # One module per file, named after its path, so two files called models.py do not collide
    # and a second resolve of the same file reuses the first import.
    name = f"lepton_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot import {path} for {spec!r}: not a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's module failing to import is a config error
        del sys.modules[name]
        log.error("factory_import_failed", factory=spec, exc_info=True)
        raise ConfigError(f"importing {path} for {spec!r} raised {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        cwd = Path.cwd()
        # Console scripts do not put the current directory on sys.path (``python -m`` does):
        # look there for the module a user names from where they stand.
        here = (cwd / f"{top}.py").is_file() or (cwd / top).is_dir()
        if exc.name != top or not here or str(cwd) in sys.path:
            raise ConfigError(f"cannot import {module_name!r} for {spec!r}: {exc}") from exc
        sys.path.append(str(cwd))
        importlib.invalidate_caches()
        return _import_module(module_name, spec)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {spec!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module failing to import is a config error
        log.error("factory_import_failed", factory=spec, exc_info=True)
        raise ConfigError(f"importing {module_name!r} for {spec!r} raised {type(exc).__name__}: {exc}") from exc


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Imports ``package.module:attribute`` (from sys.path, else from the current directory) or
    ``path/to/file.py:attribute``. Raises ConfigError with what went wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"{spec!r} is neither a built-in name nor 'package.module:factory' or 'path/to/file.py:factory'"
        )
    module = _import_file(module_name, spec) if is_file_factory(spec) else _import_module(module_name, spec)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None


def _call_with_known_kwargs(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Calls factory ``fn`` with the subset of ``kwargs`` its signature names explicitly (all of
    them if it opts in with ``ALL_FACTS_ATTRIBUTE``: a ``**kwargs`` that forwards to a class,
    torchvision style, would otherwise pass on names the class does not take). Raises ConfigError
    naming the exception if the factory raises (the traceback goes to the log)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if getattr(fn, ALL_FACTS_ATTRIBUTE, False) is True:
        chosen = kwargs
    else:
        named = {
            n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        chosen = {k: v for k, v in kwargs.items() if k in named}
    try:
        return fn(**chosen)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a factory that raises refuses the job, in its words
        log.error("factory_failed", factory=what, exc_info=True)
        raise ConfigError(f"{what} raised {type(exc).__name__}: {exc}") from exc


def _unknown(what: str, name: str, builtins: Sequence[str]) -> ConfigError:
    return ConfigError(
        f"unknown {what} {name!r}: built-in ones are {', '.join(builtins)}; or name a factory as "
        "package.module:factory or path/to/file.py:factory"
    )


def load_workload(dataset: str, seed: int) -> Workload:
    """The named built-in dataset, or a user factory returning a Workload or (train, test). For
    (train, test), integer labels give ``num_classes`` (the largest id + 1) and floating labels
    are regression targets (``num_classes`` 0, ``target_dim`` their size)."""
    if dataset in DATASETS:
        return DATASETS[dataset](seed=seed)
    if ":" not in dataset:
        raise _unknown("dataset", dataset, list(DATASETS))
    result = _call_with_known_kwargs(f"dataset factory {dataset!r}", resolve_factory(dataset), seed=seed)
    if isinstance(result, Workload):
        return result
    if not (isinstance(result, Sequence) and len(result) == 2):
        raise ConfigError(f"dataset factory {dataset!r} must return (train, test) or a Workload")
    train, test = result
    if len(train) == 0:
        raise ConfigError(f"dataset {dataset!r} has no training samples")
    x0, y0 = train[0]
    input_dim = int(torch.as_tensor(x0).numel())
    y0 = torch.as_tensor(y0)
    if y0.is_floating_point():
        return Workload(train, test, input_dim, 0, target_dim=int(y0.numel()))
    labels = [int(train[i][1]) for i in range(len(train))]
    return Workload(train, test, input_dim, max(labels) + 1)


def build_model(model: str, workload: Workload, seed: int, output_dim: int | None = None) -> nn.Module:
    """The named model initialised from ``seed`` (identical in every process). ``output_dim`` is
    the width of its output (``Workload.output_dim`` of the job's task and loss); None: one per
    class of class-id data, else one per target value. A factory receives those of
    ``input_dim``, ``output_dim``, ``num_classes`` (class-id data only) and ``vocab_size`` that its
    signature names."""
    if model not in MODELS and ":" not in model:
        raise _unknown("model", model, list(MODELS))
    factory = MODELS.get(model) or resolve_factory(model)
    torch.manual_seed(seed)
    if output_dim is None:
        output_dim = workload.num_classes or workload.target_dim
    facts: dict[str, Any] = {"input_dim": workload.input_dim, "output_dim": output_dim}
    if workload.num_classes > 0:
        facts["num_classes"] = workload.num_classes
    if workload.vocab_size is not None:
        facts["vocab_size"] = workload.vocab_size
    module = _call_with_known_kwargs(f"model factory {model!r}", factory, **facts)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model factory {model!r} returned {type(module).__name__}, not nn.Module")
    return module


def check_loss(model: nn.Module, workload: Workload, loss: str, task: str) -> None:
    """Resolves ``loss`` and computes it on the model's output for the first two training samples
    (no gradient, evaluation mode, so neither parameters nor buffers change), so that a loss that
    does not fit the data or the model is refused before training. Raises ConfigError."""
    loss_fn = resolve_loss(loss)
    x, y = take(workload.train, torch.arange(min(2, len(workload.train))))  # type: ignore[arg-type]
    labels = workload.train.tensors[1] if isinstance(workload.train, TensorDataset) else y
    if loss == "bce_with_logits" and bool(((labels != 0) & (labels != 1)).any()):
        raise ConfigError("loss 'bce_with_logits' needs 0/1 labels (one per logit); these data hold other values")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(x)
            value = loss_fn(output, shape_target(loss, task, output, y))
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise ConfigError(f"loss {loss!r} must return a scalar tensor, got {type(value).__name__}")
    except ConfigError:
        raise
    except Exception as exc:  # torch's own shape and dtype errors say what does not fit
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = " (real-valued labels: a regression loss such as mse)" if y.is_floating_point() else ""
        raise ConfigError(
            f"loss {loss!r} does not fit the data or the model (labels {tuple(y.shape)} {y.dtype}{hint}): "
            f"{type(exc).__name__}: {first}"
        ) from exc
    finally:
        model.train(was_training)


def take(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, labels) batch of the given sample indices; labels keep their dtype (plain
    Python ints become int64, floats float32)."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors
        return x[indices], y[indices]
    items = [dataset[int(i)] for i in indices]
    labels = [torch.as_tensor(y) for _, y in items]
    if labels and labels[0].is_floating_point():
        labels = [y.to(torch.float32) if y.dtype == torch.float64 else y for y in labels]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.stack(labels)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    batch_size: int = 512,
    *,
    task: str = CLASSIFICATION,
    loss: str = "cross_entropy",
    loss_fn: LossFn | None = None,
) -> Evaluation:
    """The task's metrics and the mean loss of ``model`` on ``dataset``. ``loss`` names the job's
    loss (it decides how targets are shaped and, for ``bce_with_logits``, how logits become
    predictions); ``loss_fn`` is that loss resolved (None: resolved here)."""
    loss_fn = loss_fn if loss_fn is not None else resolve_loss(loss)
    n = len(dataset)  # type: ignore[arg-type]
    classes = ClassificationTally(loss, num_classes)
    labels = MultiLabelRecall()
    values = RegressionTally()
    loss_sum = 0.0
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            x, y = take(dataset, torch.arange(lo, min(n, lo + batch_size)))
            output = model(x)
            # a mean loss, weighted by the batch's size, so the result is the mean over samples
            loss_sum += float(loss_fn(output, shape_target(loss, task, output, y))) * len(y)
            if task == REGRESSION:
                values.add(output, y)
            else:
                classes.add(output, y)
                if loss == "bce_with_logits" and output.dim() > 1 and output.shape[-1] > 1:
                    labels.add(output, y)
    elapsed = max(time.perf_counter() - start, 1e-9)
    model.train()
    common = dict(loss=loss_sum / max(n, 1), samples=n, inference_samples_per_second=n / elapsed, task=task)
    if task == REGRESSION:
        r: RegressionMetrics = values.metrics()
        return Evaluation(accuracy=None, macro_recall=None, mse=r.mse, mae=r.mae, r2=r.r2, **common)  # type: ignore[arg-type]
    c: ClassificationMetrics = classes.metrics(labels.recall() if labels.hits is not None else None)
    return Evaluation(
        accuracy=c.accuracy,
        macro_recall=c.macro_recall,
        per_class_recall=c.per_class_recall,
        confusion_matrix=c.confusion_matrix,
        **common,  # type: ignore[arg-type]
    )
