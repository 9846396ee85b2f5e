"""What Lepton carries of a user's model: every state_dict tensor once, with its kind."""

from __future__ import annotations

import torch
from torch import nn

from lepton.ops.export import _join_slices
from lepton.tensors import TensorKind, TensorSpec, row_slice
from lepton.wire import spec_from_proto, spec_to_proto
from lepton.workloads import model_tensors, tensor_kinds, tied_names


class Tied(nn.Module):
    """A language-model head tied to its embedding, a frozen scale, BatchNorm and a buffer that
    is not persistent (rebuilt by the constructor, not part of the state_dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embedding.weight
        self.scale = nn.Parameter(torch.ones(4), requires_grad=False)
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("cache", torch.zeros(3), persistent=False)


def test_model_tensors_carry_each_tensor_once_with_its_kind():
    model = Tied()
    tensors = model_tensors(model)
    assert list(tensors) == [  # torch's order: a module's own parameters before its children's
        "scale", "embedding.weight", "norm.weight", "norm.bias",
        "norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
    ]
    kinds = tensor_kinds(model)
    assert kinds["embedding.weight"] is TensorKind.PARAMETER
    assert kinds["scale"] is TensorKind.FROZEN
    assert kinds["norm.running_var"] is TensorKind.BUFFER and kinds["norm.num_batches_tracked"] is TensorKind.BUFFER
    assert tied_names(model) == {"head.weight": "embedding.weight"}
    assert tensors["norm.running_mean"] is model.norm.running_mean  # live: a pull writes into the model


def test_an_export_writes_a_tied_tensor_under_every_name_and_loads_strictly():
    model = Tied()
    carried = {n: t.detach().clone() for n, t in model_tensors(model).items()}
    manifest = {"checkpoint_id": "c-1", "slices": {}, "tied": tied_names(model)}
    exported = _join_slices(manifest, carried)
    fresh = Tied()
    fresh.load_state_dict(exported, strict=True)
    assert torch.equal(fresh.head.weight, model.embedding.weight)


def test_the_kind_survives_the_wire_and_row_slicing():
    spec = TensorSpec("norm.running_mean", torch.float32, (8,), kind=TensorKind.BUFFER)
    assert spec_from_proto(spec_to_proto(spec)).kind is TensorKind.BUFFER
    assert row_slice(spec, 0, 4).kind is TensorKind.BUFFER
    frozen = TensorSpec("w", torch.float32, (2, 2), kind=TensorKind.FROZEN)
    assert not frozen.pushed and not frozen.trainable and spec.pushed


def test_a_sender_before_kinds_means_a_parameter():
    from lepton.v1 import common_pb2 as pb

    old = pb.TensorInfo(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2])
    assert spec_from_proto(old).kind is TensorKind.PARAMETER
