"""ALiBi: a per-head linear penalty on distance (Press et al., 2021, arXiv 2108.12409)."""

from __future__ import annotations

import math

import torch

from ..errors import ShapeError
from .base import Score


def alibi_slopes(heads: int) -> torch.Tensor:
    """The paper's head slopes: the geometric sequence ``2^(-8/n), 2^(-16/n), ...`` for ``n`` heads.

    For a head count that is not a power of two, the paper's recipe: the slopes of the closest lower
    power of two ``n``, then every other slope of ``2n`` for the remaining heads.
    """
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ShapeError(f"heads must be a positive integer, got {heads!r}")

    def power_of_two(n: int) -> list[float]:
        first = 2.0 ** (-8.0 / n)
        return [first ** (i + 1) for i in range(n)]

    n = 2 ** math.floor(math.log2(heads))
    slopes = power_of_two(n) + power_of_two(2 * n)[0::2][: heads - n]
    return torch.tensor(slopes, dtype=torch.float64)


class ALiBi(Score):
    """Adds ``-slope_h * |i - j|`` to the logit of query i and key j; no position embeddings.

    Under a causal pattern this is the paper's ``-m * (i - j)``; without one it is the symmetric
    form used by FlashAttention for bidirectional attention.
    """

    additive = True
    relative = True

    def __init__(self, heads: int):
        super().__init__()
        self.num_heads = heads
        self.register_buffer("slopes", alibi_slopes(heads).float(), persistent=False)

    def forward(self, score, b, h, q_idx, kv_idx):
        distance = (q_idx - kv_idx).abs()
        return score - (self.slopes.to(score.device)[h] * distance).to(score.dtype)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}"
