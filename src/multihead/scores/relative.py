"""Learnable relative position bias with log-spaced buckets (T5: Raffel et al., 2019, arXiv 1910.10683)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from .base import Score


def relative_position_bucket(relative_position: Tensor, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """T5's bucket of ``relative_position = key - query``.

    Half the buckets (of each direction, when bidirectional) hold exact distances; the rest cover
    distances up to ``max_distance`` on a log scale, and farther ones share the last bucket. Causal
    (not bidirectional) buckets map every future key to bucket 0.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    scaled = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (scaled * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(is_small, distance, large)


class RelativePositionBias(Score):
    """Adds a learned per-head scalar ``table[bucket(j - i), h]`` to each logit.

    ``bidirectional=False`` gives the causal (decoder) bucketing. The table trains through every
    backend that serves the score.
    """

    additive = True
    relative = True

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True):
        super().__init__()
        for name, value, low in (("heads", heads, 1), ("num_buckets", num_buckets, 4),
                                 ("max_distance", max_distance, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ShapeError(f"RelativePositionBias.{name} must be an integer >= {low}, got {value!r}")
        if max_distance <= num_buckets // (4 if bidirectional else 2):
            raise ShapeError(
                f"RelativePositionBias.max_distance={max_distance} must exceed the exact range "
                f"{num_buckets // (4 if bidirectional else 2)}; raise max_distance or lower num_buckets")
        self.num_heads = heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.table = nn.Parameter(torch.randn(num_buckets, heads) * 0.02)

    def forward(self, score, b, h, q_idx, kv_idx):
        bucket = relative_position_bucket(kv_idx - q_idx, bidirectional=self.bidirectional,
                                          num_buckets=self.num_buckets, max_distance=self.max_distance)
        index = bucket * self.num_heads + h
        if index.dim() == 0:  # FlexAttention's elementwise (vmapped) call
            return score + self.table[bucket, h].to(score.dtype)
        # a block of logits: one gather from the flat table, whose backward is index_add_ along
        # dim 0, 10x faster on CPU than the accumulating index_put_ behind table[bucket, h] (0.3
        # against 3.1 ms for a block-sparse group of 4 heads x 32 rows x 1024 keys)
        shape = torch.broadcast_shapes(score.shape, index.shape)
        bias = self.table.view(-1).index_select(0, index.expand(shape).reshape(-1)).view(shape)
        return score + bias.to(score.dtype)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, bidirectional={self.bidirectional}")
