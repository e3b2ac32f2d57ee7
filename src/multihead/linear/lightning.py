"""Lightning attention (TransNormerLLM: Qin et al., 2023, "TransNormerLLM: A Faster and Better Large
Language Model with Improved TransNormer", arXiv 2307.14995)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..nn.attention import merge_heads
from .base import RecurrentAttention
from .engine import chunked_linear_attention, recurrent_linear_attention


def lightning_decays(heads: int, layer: int = 0, layers: int = 1) -> Tensor:
    """TransNormerLLM's log-decays: ``-m_h * (1 - layer / (layers - 1))`` with ``m_h = 2^(-8h/H)``
    (ALiBi's slopes, h = 1..H), so deeper layers forget less and the last layer not at all."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)
    depth = 1.0 if layers == 1 else 1 - layer / (layers - 1)
    return -slopes * depth


class LightningAttention(RecurrentAttention):
    """TransNormerLLM's gated linear attention, computed by lightning attention.

    Against standard attention: no softmax; ``q`` and ``k`` pass through SiLU and the weight of key
    ``j`` for query ``i`` is ``(q_i . k_j) * lambda_h^(i-j)`` with a fixed decay per head
    (``lightning_decays``, set by ``layer`` of ``layers``); the output is RMS-normalised (without a
    learned scale, TransNormerLLM's SRMSNorm) and multiplied by a gate ``x W_u`` before the output
    projection. The chunked form is the lightning algorithm itself: dense inside blocks of
    ``chunk_size`` tokens, a recurrence over ``(head_dim, head_dim)`` states between them.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None, *,
                 layer: int = 0, layers: int = 1, eps: float = 1e-6, **options):
        super().__init__(dim, heads, kv_heads, head_dim, **options)
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1 or not 0 <= layer < layers:
            raise ShapeError(f"layer must be in [0, layers) and layers >= 1, got layer={layer!r}, layers={layers!r}")
        self.layer, self.layers, self.eps = layer, layers, float(eps)
        self.register_buffer("log_decay", lightning_decays(heads, layer, layers).float())
        self.gate = nn.Linear(dim, heads * self.head_dim, bias=self.q_proj.bias is not None)

    def mix(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens, initial_state):
        return self.run_form(chunked_linear_attention, recurrent_linear_attention, q, k, v, feature_map=F.silu,
                             log_decay=self.log_decay, cu_seqlens=cu_seqlens, initial_state=initial_state)

    def combine(self, out: Tensor, x: Tensor) -> Tensor:
        merged = merge_heads(out)
        normed = merged * torch.rsqrt(merged.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.out_proj(normed * self.gate(x))
