"""Gradient compression with error feedback, the worker's half of JobSpec.gradient_compression
(the wire encodings are ``lepton.encodings``).

For each pushed tensor the worker sends ``C(g + r)`` and keeps ``r' = g + r - D(C(g + r))``, the
error the encoding made, to add to the next gradient: over many steps the sum of what the servers
receive tracks the sum of the true gradients. Residuals are kept per whole parameter (full shape,
on the gradient's device), so a tensor cut into row slices, and a layout that cuts it anew, share
one residual.

A push's residuals are committed only once a server has applied it (``commit``): a stale push, a
failed one, or one whose answer never came leaves them as they were, and a retry re-sends the same
encoded bytes (the caller keeps the ``Compressed`` of a request id). Pure torch: no grpc.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lepton import encodings
from lepton.config import JobSpec
from lepton.encodings import Encoded
from lepton.tensors import TensorSpec, part

# A TOPK tensor travels as one chunk: one that would be larger goes raw, which the data plane
# splits into messages (lepton.codec.STREAM_CHUNK_BYTES, inside the 8 MiB receive limit).
TOPK_MAX_BYTES = 4 << 20


@dataclass
class Compressed:
    """One server's share of a push, ready to send: ``tensors`` by name (Encoded, or raw where
    nothing is encoded), and the residual each encoded tensor leaves once the push is applied."""

    tensors: dict[str, torch.Tensor | Encoded]
    residuals: dict[str, tuple[TensorSpec, torch.Tensor]] = field(default_factory=dict)


class ErrorFeedback:
    """Compresses a worker's pushes by ``encoding`` (``lepton.encodings``; TOPK keeps
    ``topk_ratio`` of each tensor's elements), remembering the error each push made."""

    def __init__(self, encoding: int, topk_ratio: float = 0.01) -> None:
        if encoding not in encodings.NAMES:
            raise ValueError(f"unknown encoding {encoding}")
        self.encoding = encoding
        self.topk_ratio = topk_ratio
        self._residuals: dict[str, torch.Tensor] = {}  # whole parameter name -> residual, full shape

    @classmethod
    def for_job(cls, spec: JobSpec) -> ErrorFeedback | None:
        """The compression a job asks for, or None (gradient_compression "none")."""
        encoding = encodings.BY_COMPRESSION.get(spec.gradient_compression)
        return None if encoding is None else cls(encoding, spec.topk_ratio)

    def encodes(self, spec: TensorSpec, grad: torch.Tensor) -> bool:
        """Whether this tensor's gradient is encoded: a trainable floating-point parameter's dense
        gradient with elements (row-sparse gradients and buffers' changes travel raw)."""
        return (
            spec.trainable and not grad.is_sparse and grad.is_floating_point() and grad.numel() > 0
            and (self.encoding != encodings.TOPK or grad.numel() <= encodings.MAX_TOPK_ELEMENTS)
        )

    def residual(self, spec: TensorSpec) -> torch.Tensor | None:
        """The residual of the rows ``spec`` names (a view), or None while there is none."""
        if spec.of not in self._residuals:
            return None
        return part(self._residuals, spec)

    def compress(self, share: Mapping[str, tuple[TensorSpec, torch.Tensor]]) -> Compressed:
        """One server's share (name -> (its spec, its gradient)) encoded; changes nothing here."""
        out = Compressed({})
        for name, (spec, grad) in share.items():
            if not self.encodes(spec, grad):
                out.tensors[name] = grad
                continue
            residual = self.residual(spec)
            corrected = grad.detach() if residual is None else grad.detach() + residual
            if self.encoding == encodings.TOPK and not self._topk_pays(grad):
                out.tensors[name] = corrected  # raw: all of it is sent, nothing is left over
                out.residuals[name] = (spec, torch.zeros_like(corrected))
                continue
            encoded, sent = encodings.encode(corrected, self.encoding, self.topk_ratio)
            out.tensors[name] = encoded
            out.residuals[name] = (spec, corrected - sent)
        return out

    def _topk_pays(self, grad: torch.Tensor) -> bool:
        """Whether TOPK bytes are fewer than the raw ones and fit one chunk of at most
        TOPK_MAX_BYTES (a TOPK tensor travels as one chunk): else the tensor travels raw."""
        size = encodings.topk_bytes(grad.numel(), grad.dtype, self.topk_ratio)
        return size < grad.numel() * grad.element_size() and size <= TOPK_MAX_BYTES

    def commit(self, compressed: Compressed) -> None:
        """A server applied ``compressed``: its tensors' residuals become the ones it left."""
        for spec, residual in compressed.residuals.values():
            whole = self._residuals.get(spec.of)
            if whole is None:
                if not spec.is_slice:
                    self._residuals[spec.of] = residual.clone()
                    continue
                whole = torch.zeros(spec.parameter_shape, dtype=residual.dtype, device=residual.device)
                self._residuals[spec.of] = whole
            part(self._residuals, spec).copy_(residual)

    def residual_norm(self) -> float:
        """The L2 norm of every residual together (for logs and tests)."""
        total = sum(float(r.double().pow(2).sum()) for r in self._residuals.values())
        return total**0.5
