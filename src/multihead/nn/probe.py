"""Attentive probing: a classifier that pools a frozen model's tokens by cross-attention.

``AttentiveProbe(dim, classes, efficient=False)`` is the usual attentive probe (as in the probes of
masked image models): one learned query token attends, through a multi-head cross-attention with its
own q, k, v and output projections, over the frozen tokens, and a linear layer classifies the pooled
vector. ``efficient=True`` is Efficient Probing (Psomas et al., 2025, "Attention, Please! Revisiting
Attentive Probing for Masked Image Modeling"): a multi-query cross-attention with the redundant
projections removed. Against standard attention, ``queries`` learned query vectors attend directly to
the tokens - keys and values are the tokens themselves - so it runs as multi-query attention (each
learned query a head, one shared key/value head) through ``multihead.attention``, and the pooled
vectors are averaged before the classifier. The removed projections are redundant: a learned query
``q`` against ``W_k x`` scores like the query ``W_k^T q`` against ``x``, and ``W_o W_v`` before a linear
classifier folds into it, so one efficient query is exactly as expressive as a one-head standard
probe (``tests/test_probe.py`` maps one onto the other), with fewer parameters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..patterns import KeyPadding
from .attention import MultiHeadAttention


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


class AttentiveProbe(nn.Module):
    """Classify ``(batch, tokens, dim)`` frozen features by attentive pooling (module docstring).

    Args:
        dim: width of the tokens.
        classes: outputs of the linear classifier.
        heads: heads of the standard probe's cross-attention (``efficient=False``).
        queries: learned queries of Efficient Probing (``efficient=True``).
        efficient: Efficient Probing instead of the standard attentive probe.
        backend: the ``multihead.attention`` backend.
    """

    def __init__(self, dim: int, classes: int, *, heads: int = 8, queries: int = 4, efficient: bool = True,
                 backend: str = "auto"):
        super().__init__()
        self.dim, self.classes = _positive_int("dim", dim), _positive_int("classes", classes)
        self.efficient, self.backend = bool(efficient), backend
        if self.efficient:
            self.queries = nn.Parameter(torch.randn(_positive_int("queries", queries), dim) * dim ** -0.5)
            self.pool = None
        else:
            self.queries = nn.Parameter(torch.randn(1, dim) * dim ** -0.5)
            self.pool = MultiHeadAttention(dim, _positive_int("heads", heads), backend=backend)
        self.classifier = nn.Linear(dim, classes)

    def pooled(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """The pooled vector ``(batch, dim)`` the classifier reads."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ShapeError(f"x must be (batch, tokens, {self.dim}) features, got {getattr(x, 'shape', x)!r}")
        batch = x.shape[0]
        if not self.efficient:
            query = self.queries.to(x.dtype).expand(batch, 1, self.dim)
            return self.pool(query, x, key_padding_mask=key_padding_mask)[:, 0]
        q = self.queries.to(x.dtype).view(1, -1, 1, self.dim).expand(batch, -1, -1, -1)
        kv = x.unsqueeze(1)  # one key/value head shared by every query: the tokens themselves
        pattern = None if key_padding_mask is None else KeyPadding(key_padding_mask)
        out = attention(q, kv, kv, pattern=pattern, scale=1.0 / math.sqrt(self.dim), backend=self.backend)
        return out[:, :, 0].mean(1)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Class logits ``(batch, classes)``; ``key_padding_mask`` ``(batch, tokens)``, True at padding."""
        return self.classifier(self.pooled(x, key_padding_mask))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, classes={self.classes}, efficient={self.efficient}, queries={self.queries.shape[0]}"
