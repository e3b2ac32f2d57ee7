"""A score evaluated at shifted heads and positions: for pieces cut out of a larger request."""

from __future__ import annotations

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
