"""The built-in models by name, and ``build_model``: a built-in one or a user factory's, initialised
from the job's seed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lepton.errors import ConfigError
from lepton.factories import call_with_known_kwargs, resolve_factory, unknown
from lepton.workloads.workload import Workload


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


def build_model(model: str, workload: Workload, seed: int, output_dim: int | None = None) -> nn.Module:
    """The named model initialised from ``seed`` (identical in every process). ``output_dim`` is
    the width of its output (``Workload.output_dim`` of the job's task and loss); None: one per
    class of class-id data, else one per target value. A factory receives those of
    ``input_dim``, ``output_dim``, ``num_classes`` (class-id data only) and ``vocab_size`` that its
    signature names."""
    if model not in MODELS and ":" not in model:
        raise unknown("model", model, list(MODELS))
    factory = MODELS.get(model) or resolve_factory(model)
    torch.manual_seed(seed)
    if output_dim is None:
        output_dim = workload.num_classes or workload.target_dim
    facts: dict[str, Any] = {"input_dim": workload.input_dim, "output_dim": output_dim}
    if workload.num_classes > 0:
        facts["num_classes"] = workload.num_classes
    if workload.vocab_size is not None:
        facts["vocab_size"] = workload.vocab_size
    module = call_with_known_kwargs(f"model factory {model!r}", factory, **facts)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model factory {model!r} returned {type(module).__name__}, not nn.Module")
    return module
