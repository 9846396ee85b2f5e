"""Built-in datasets and models, user factories (``package.module:factory``), batching and
evaluation. Pure torch: the worker and coordinator both build the same model from the same seed."""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lepton.errors import ConfigError

SPLIT_SEED = 0  # the train/test split of built-in datasets never depends on the job's seed


@dataclass(frozen=True)
class Workload:
    """A dataset pair and the facts a model factory needs."""

    train: Dataset
    test: Dataset
    input_dim: int
    num_classes: int


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


DATASETS: dict[str, Callable[..., Workload]] = {"digits": _digits, "synthetic-image": _synthetic_image}


def _mlp(input_dim: int, num_classes: int, hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp}


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Imports ``package.module:attribute``. Raises ConfigError with what went wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{spec!r} is neither a built-in name nor 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {spec!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None


def _call_with_known_kwargs(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Calls ``fn`` with the subset of ``kwargs`` its signature names."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def load_workload(dataset: str, seed: int) -> Workload:
    """The named built-in dataset, or a user factory returning a Workload or (train, test)."""
    if dataset in DATASETS:
        return DATASETS[dataset](seed=seed)
    result = _call_with_known_kwargs(resolve_factory(dataset), seed=seed)
    if isinstance(result, Workload):
        return result
    if not (isinstance(result, Sequence) and len(result) == 2):
        raise ConfigError(f"dataset factory {dataset!r} must return (train, test) or a Workload")
    train, test = result
    if len(train) == 0:
        raise ConfigError(f"dataset {dataset!r} has no training samples")
    x0, _ = train[0]
    labels = [int(train[i][1]) for i in range(len(train))]
    return Workload(train, test, int(torch.as_tensor(x0).numel()), max(labels) + 1)


def build_model(model: str, workload: Workload, seed: int) -> nn.Module:
    """The named model initialised from ``seed`` (identical in every process)."""
    factory = MODELS.get(model) or resolve_factory(model)
    torch.manual_seed(seed)
    module = _call_with_known_kwargs(
        factory, input_dim=workload.input_dim, num_classes=workload.num_classes
    )
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model factory {model!r} returned {type(module).__name__}, not nn.Module")
    return module


def take(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, labels) batch of the given sample indices."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors
        return x[indices], y[indices]
    items = [dataset[int(i)] for i in indices]
    return (
        torch.stack([torch.as_tensor(x) for x, _ in items]),
        torch.tensor([int(y) for _, y in items], dtype=torch.int64),
    )


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    macro_recall: float
    loss: float
    samples: int
    inference_samples_per_second: float


def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, batch_size: int = 512) -> Evaluation:
    """Accuracy, macro recall (unweighted mean of per-class recall) and mean cross-entropy."""
    n = len(dataset)  # type: ignore[arg-type]
    correct_per_class = torch.zeros(num_classes, dtype=torch.int64)
    count_per_class = torch.zeros(num_classes, dtype=torch.int64)
    loss_sum = 0.0
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            x, y = take(dataset, torch.arange(lo, min(n, lo + batch_size)))
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            hit = logits.argmax(dim=1) == y
            count_per_class += torch.bincount(y, minlength=num_classes)
            correct_per_class += torch.bincount(y[hit], minlength=num_classes)
    elapsed = max(time.perf_counter() - start, 1e-9)
    model.train()
    present = count_per_class > 0
    recall = (correct_per_class[present].double() / count_per_class[present].double()).mean()
    return Evaluation(
        accuracy=float(correct_per_class.sum()) / max(n, 1),
        macro_recall=float(recall) if present.any() else 0.0,
        loss=loss_sum / max(n, 1),
        samples=n,
        inference_samples_per_second=n / elapsed,
    )
