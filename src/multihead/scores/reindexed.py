"""A score evaluated at other heads and positions than its frame's: shifted, for pieces cut out of
a larger request (``Reindexed``), or permuted, for a frame whose tokens were reordered
(``Reordered``)."""

from __future__ import annotations

from torch import Tensor

from .base import Score


class Reindexed(Score):
    """``score`` as seen from a piece of a request: local head ``h`` is head ``h + heads`` and local
    positions ``i`` are ``i + positions`` of the whole. Used where a request is split (one packed
    document at a time, a slice of the heads per rank) so the score keeps its global meaning."""

    def __init__(self, score: Score, *, heads: int = 0, positions: int = 0):
        super().__init__()
        self.inner, self.heads, self.positions = score, heads, positions
        self.additive, self.batch_dependent = score.additive, score.batch_dependent
        self.relative = score.relative

    def forward(self, score, b, h, q_idx, kv_idx):
        return self.inner(score, b, h + self.heads, q_idx + self.positions, kv_idx + self.positions)


class Reordered(Score):
    """``score`` evaluated at the original positions of a permuted frame: row ``i`` of head ``h`` in
    batch element ``b`` is query ``q_order[b, h, i]`` (and key ``kv_order[b, h, j]`` for column
    ``j``), ``(B, H, L)`` permutations. ``Routing`` sorts tokens by cluster, so a relative bias
    (ALiBi, T5) must still see the tokens' own distances. The native kernel reads the orders as
    the positions of its relative-bias columns."""

    def __init__(self, score: Score, q_order: Tensor, kv_order: Tensor):
        super().__init__()
        self.inner, self.q_order, self.kv_order = score, q_order, kv_order
        self.additive = score.additive
        self.batch_dependent = True

    def forward(self, score, b, h, q_idx, kv_idx):
        return self.inner(score, b, h, self.q_order[b, h, q_idx], self.kv_order[b, h, kv_idx])
