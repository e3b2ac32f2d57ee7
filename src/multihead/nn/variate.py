"""Variate-wise attention with gates, after Gateformer ("Gateformer: Advancing Multivariate Time
Series Forecasting through Temporal and Variate-Wise Attention with Gated Representations", 2025).

Against attention over time steps, the tokens are the variates: each variate's whole series is
embedded on its own (cross-time stage), then attention runs across the variates (cross-variate
stage), so a variate reads the others. Both stages are gated:

    e_v = (W s_v) * sigmoid(G s_v)                      (s_v: the series of variate v, length T)
    y_v = e_v + A(e)_v * sigmoid(H e_v)                 (A: multi-head attention over the variates)

The abstract gives the structure (variate tokens, attention across them, gating in both stages);
the gates here - a sigmoid of a linear map multiplying the embedding and the attention output - are
this library's reading of it. The attention is a ``MultiHeadAttention`` (any pattern, backend).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from .attention import MultiHeadAttention


class VariateAttention(nn.Module):
    """``forward(series)``: ``(batch, length, variates)`` -> variate tokens ``(batch, variates, dim)``
    (module docstring); ``**options`` go to the ``MultiHeadAttention`` across variates."""

    def __init__(self, length: int, dim: int, heads: int, **options):
        super().__init__()
        for name, value in (("length", length), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShapeError(f"{name} must be a positive integer, got {value!r}")
        self.length, self.dim = length, dim
        self.embed, self.embed_gate = nn.Linear(length, dim), nn.Linear(length, dim)
        self.attention = MultiHeadAttention(dim, heads, **options)
        self.gate = nn.Linear(dim, dim)

    def forward(self, series: Tensor) -> Tensor:
        if not isinstance(series, Tensor) or series.dim() != 3 or series.shape[1] != self.length:
            raise ShapeError(f"series must be (batch, {self.length}, variates), got {getattr(series, 'shape', series)!r}")
        s = series.transpose(1, 2)  # one row per variate
        e = self.embed(s) * torch.sigmoid(self.embed_gate(s))
        return e + self.attention(e) * torch.sigmoid(self.gate(e))
