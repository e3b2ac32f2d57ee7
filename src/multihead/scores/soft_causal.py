"""iLLaMA's soft causal mask as a score (Wang et al., 2024, "Adapting LLaMA Decoder to Vision
Transformer", arXiv 2404.06773)."""

from __future__ import annotations

import math

from ..errors import ShapeError
from .base import Score


class SoftCausal(Score):
    """Weights a query's future keys by ``rate`` in ``(0, 1]`` before the softmax normalises them.

    iLLaMA's soft mask is ``M = rate * 1 + (1 - rate) * tril``: the bidirectional mask blended into
    the causal one, ``rate`` decayed from 1 to 0 early in training (``multihead.nn.soft_causal``).
    Applied to the unnormalised weights ``exp(s)``, it is the additive term ``log M``: ``log(rate)`` on
    every key after the query, 0 elsewhere, so ``rate = 1`` is plain bidirectional attention and the
    limit ``rate -> 0`` is ``Causal()`` (the pattern a module uses at ``rate = 0``). Queries are
    bottom-right aligned (scores get query indices in the key frame).
    """

    additive = True

    def __init__(self, rate: float):
        super().__init__()
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate <= 1.0:
            raise ShapeError(f"SoftCausal.rate must be in (0, 1] (use the Causal() pattern for 0), got {rate!r}")
        self.rate = float(rate)

    def forward(self, score, b, h, q_idx, kv_idx):
        future = (kv_idx > q_idx).to(score.dtype)
        return score + future * math.log(self.rate)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
