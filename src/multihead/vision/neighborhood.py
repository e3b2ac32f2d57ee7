"""NAT / DiNAT neighborhood attention on a feature map."""

from __future__ import annotations

from ..patterns import Neighborhood
from ..patterns.grid import per_axis
from .base import GridAttention, make_relative_bias


class NeighborhoodAttention2d(GridAttention):
    """Neighborhood attention (Hassani et al., 2023, "Neighborhood Attention Transformer", arXiv
    2204.07143), dilated (Hassani & Shi, 2022, "Dilated Neighborhood Attention Transformer", arXiv
    2209.15001).

    Instead of every position, a position sees the ``kernel x kernel`` positions around it (the
    window shifted inward at the edges, NATTEN's convention: the ``Neighborhood`` pattern), taken
    every ``dilation`` positions, plus NAT's relative position bias (a ``(2 * kernel - 1)^2`` table
    per head, indexed in units of the dilation; ``relative_bias="dynamic"`` computes it with
    CrossFormer's DPB instead, ``None`` leaves it out). DiNAT
    alternates ``dilation=1`` and a larger dilation between layers. A map smaller than
    ``kernel * dilation`` on an axis uses the largest kernel (then dilation) that fits.
    """


    def __init__(self, dim: int, heads: int, kernel=7, dilation=1, relative_bias: str | None = "table", **options):
        super().__init__(dim, heads, **options)
        self.kernel = per_axis("NeighborhoodAttention2d", "kernel", kernel, 2, minimum=1)
        self.dilation = per_axis("NeighborhoodAttention2d", "dilation", dilation, 2, minimum=1)
        self.relative_bias = make_relative_bias("NeighborhoodAttention2d", relative_bias, heads, self.kernel)

    def _fitted(self, grid):
        kernel = tuple(min(k, n) for k, n in zip(self.kernel, grid))
        dilation = tuple(max(1, min(d, n // k)) for d, k, n in zip(self.dilation, kernel, grid))
        return kernel, dilation

    def pattern_for(self, grid):
        kernel, dilation = self._fitted(grid)
        return Neighborhood(kernel, dilation, grid=grid)

    def bound_bias(self, grid):
        if self.relative_bias is None:
            return None
        return self.relative_bias.on(grid, dilation=self._fitted(grid)[1])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel}, dilation={self.dilation}"
