"""Built-in datasets and models, user factories, batching and evaluation: pure torch, so the
worker and the coordinator build the same model from the same seed. One module per job:

- ``workload``: the Workload type and batching (``take``);
- ``datasets``: the built-in datasets by name and ``load_workload``;
- ``synthetic``: the synthetic data sets' recipes;
- ``models``: the built-in models by name and ``build_model``;
- ``model_tensors``: the tensors of a model that Lepton carries;
- ``evaluation``: ``evaluate`` and ``check_loss``.

This package re-exports their public names (and, from ``lepton.factories``, the user-factory ones).
"""

from lepton.factories import ALL_FACTS_ATTRIBUTE, absolute_factory, is_file_factory, resolve_factory
from lepton.tasks import Evaluation
from lepton.workloads.datasets import DATASETS, SPLIT_SEED, load_workload, outline_workload
from lepton.workloads.evaluation import check_loss, evaluate
from lepton.workloads.model_tensors import model_tensors, tensor_kinds, tied_names
from lepton.workloads.models import MODELS, EmbeddingBagClassifier, build_model, sparse_parameter_names
from lepton.workloads.synthetic import SYNTHETIC_IMAGE, SYNTHETIC_TEXT, GaussianMixture, TopicCorpus
from lepton.workloads.workload import Workload, take

__all__ = [
    "ALL_FACTS_ATTRIBUTE", "DATASETS", "MODELS", "SPLIT_SEED", "SYNTHETIC_IMAGE", "SYNTHETIC_TEXT",
    "EmbeddingBagClassifier", "Evaluation", "GaussianMixture", "TopicCorpus", "Workload",
    "absolute_factory", "build_model", "check_loss", "evaluate", "is_file_factory", "load_workload", "outline_workload",
    "model_tensors", "resolve_factory", "sparse_parameter_names", "take", "tensor_kinds", "tied_names",
]
