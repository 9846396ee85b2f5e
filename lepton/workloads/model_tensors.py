"""The tensors of a model that Lepton carries (parameters and persistent buffers), what each is,
and which names are tied to another."""

from __future__ import annotations

import torch
from torch import nn

from lepton.tensors import TensorKind


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
