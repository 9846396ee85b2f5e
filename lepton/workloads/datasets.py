"""The built-in datasets by name, and ``load_workload``: a built-in one or a user factory's."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import TensorDataset

from lepton.errors import ConfigError
from lepton.factories import call_with_known_kwargs, is_file_dataset, resolve_factory, unknown
from lepton.workloads.filesets import DEFAULT_LABEL_COLUMN, load_files
from lepton.workloads.synthetic import SYNTHETIC_IMAGE, _synthetic_image, _synthetic_text
from lepton.workloads.workload import Workload

SPLIT_SEED = 0  # the train/test split of built-in datasets never depends on the job's seed


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


DATASETS: dict[str, Callable[..., Workload]] = {
    "digits": _digits,
    "diabetes": _diabetes,
    "synthetic-image": _synthetic_image,
    "synthetic-text": _synthetic_text,
}


def load_workload(
    dataset: str, seed: int, feature_columns: tuple[str, ...] = (), label_column: str = DEFAULT_LABEL_COLUMN
) -> Workload:
    """The named built-in dataset, a file-backed one (``parquet:DIR``, ``npy:DIR``: read lazily,
    see ``lepton.workloads.filesets``), or a user factory returning a Workload or (train, test). For
    (train, test), integer labels give ``num_classes`` (the largest id + 1) and floating labels
    are regression targets (``num_classes`` 0, ``target_dim`` their size)."""
    if dataset in DATASETS:
        return DATASETS[dataset](seed=seed)
    if is_file_dataset(dataset):
        return load_files(dataset, feature_columns, label_column)
    if ":" not in dataset:
        raise unknown("dataset", dataset, list(DATASETS))
    result = call_with_known_kwargs(f"dataset factory {dataset!r}", resolve_factory(dataset), seed=seed)
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


def outline_workload(
    dataset: str, seed: int, feature_columns: tuple[str, ...] = (), label_column: str = DEFAULT_LABEL_COLUMN
) -> tuple[Workload, int]:
    """What the coordinator needs of a data set: a Workload to build and check the model on, and
    the number of training samples. synthetic-image gives its outline (the first block of rows;
    the whole set is about 1 s of CPU to draw); every other set is ``load_workload``'s, whole."""
    if dataset == "synthetic-image":
        return SYNTHETIC_IMAGE.outline(), SYNTHETIC_IMAGE.n_train
    workload = load_workload(dataset, seed, feature_columns, label_column)
    return workload, len(workload.train)  # type: ignore[arg-type]  # map-style; torch's stub has no __len__
