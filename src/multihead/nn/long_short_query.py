"""Long- and short-query self-attention (MQSA: "Multi-Query Self-Attention with Transition-Aware
Embedding Distillation for Sequential Recommendation", 2023). "Multi-query" there means several
queries per position, not shared key/value heads.

Against causal self-attention, where position ``i`` queries with its own token, MQSA also queries
with a window: the long query is the mean of the last ``window`` tokens ``x_{i-L+1..i}`` (fewer at the
start), projected like any query, and the two attentions over the same causal keys are mixed,

    y_i = alpha * Attn(W_q mean(x_{i-L+1..i}), K, V) + (1 - alpha) * Attn(W_q x_i, K, V),

so a short-term and a longer-term view of the user's recent items both read the history. Two
``multihead.attention`` calls with the module's backend. The transition-aware embedding distillation
of the paper is a training recipe and is not built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeError
from ..patterns import Causal
from .attention import MultiHeadAttention, attend, check_inputs, split_heads


def window_mean(x: Tensor, window: int) -> Tensor:
    """``(batch, tokens, dim)``: the mean of the last ``window`` tokens up to each position."""
    csum = torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), x.cumsum(1)], 1)
    ends = torch.arange(1, x.shape[1] + 1, device=x.device)
    starts = (ends - window).clamp(min=0)
    return (csum[:, ends] - csum[:, starts]) / (ends - starts).to(x.dtype).view(1, -1, 1)


class LongShortQueryAttention(MultiHeadAttention):
    """MQSA's causal self-attention with a long (``window``-mean) and a short (own-token) query mixed by
    ``alpha`` (module docstring); topology options as ``MultiHeadAttention``."""

    causal = True

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, window: int = 4, alpha: float = 0.5,
                 **options):
        for name in ("pattern", "kv_dim", "context_parallel"):
            if options.get(name) is not None:
                raise ShapeError(f"LongShortQueryAttention sets its own {name}; drop {name}=")
        super().__init__(dim, heads, kv_heads, pattern=Causal(), **options)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ShapeError(f"window must be a positive integer, got {window!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ShapeError(f"alpha must lie in [0, 1], got {alpha!r}")
        self.window, self.alpha = window, float(alpha)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False):
        if context is not None or need_weights:
            raise ShapeError("LongShortQueryAttention is causal self-attention: pass no context or need_weights")
        check_inputs(x, None, self.dim)
        q_short, k, v = self.project(x, x)
        q_long = split_heads(self.q_proj(window_mean(x, self.window)), self.heads)
        if self.position is not None:
            q_long, _ = self.position(q_long, k)
        short, _ = attend(self, q_short, k, v, key_padding_mask=key_padding_mask)
        long, _ = attend(self, q_long, k, v, key_padding_mask=key_padding_mask)
        return self.combine(self.alpha * long + (1 - self.alpha) * short, x)
