"""Two attention passes over one token set, each with its own grouping of the tokens.

- ``SharedAxisAttention`` (the attention of MambAttention, 2025, "MambAttention: Mamba with
  Multi-Head Attention for Generalizable Single-Channel Speech Enhancement"): on a
  time x frequency grid, attention along the time axis, then along the frequency axis, both with
  one and the same set of weights (against two independent axial attentions, the weights are
  shared between the axes). The Mamba layers of that model are not attention and are not built.
- ``LongRangeGroupingAttention`` (LRGT, 2023, "Long-Range Grouping Transformer for Multi-View 3D
  Reconstruction"): tokens of ``views`` views (view-major, ``n`` per view); an
  intra-view pass (a token sees its own view: ``BlockLocal(n)``), then a long-range grouping pass:
  the tokens are split into ``groups`` groups that each take tokens from every view (here token
  ``i`` of each view goes to group ``i mod groups``: ``Dilated(views * n // groups, groups)``), and
  attention runs within each group, across the views.

Each pass is a ``MultiHeadAttention`` with a residual; ``forward`` returns the update of the two
residual sub-layers (``x + module(x)`` is the pair).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ShapeError
from ..patterns import Axial, BlockLocal, Dilated
from .attention import MultiHeadAttention, attend, check_inputs


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


class SharedAxisAttention(nn.Module):
    """Time-axis then frequency-axis attention with shared weights on a ``grid = (time, frequency)``
    of tokens (row-major: token ``t * frequency + f``), module docstring."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], **options):
        super().__init__()
        if options.get("pattern") is not None:
            raise ShapeError("SharedAxisAttention sets its own patterns; drop pattern=")
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise ShapeError(f"grid must be (time, frequency), got {grid!r}")
        self.grid = (_positive("grid[0]", grid[0]), _positive("grid[1]", grid[1]))
        self.dim = dim
        self.attention = MultiHeadAttention(dim, heads, **options)
        self.time, self.frequency = Axial(self.grid, axis=0), Axial(self.grid, axis=1)

    pattern_restricts_mixing = False  # the axes are the module's own patterns

    def forward(self, x: Tensor) -> Tensor:
        check_inputs(x, None, self.dim)
        if x.shape[1] != self.grid[0] * self.grid[1]:
            raise ShapeError(f"x has {x.shape[1]} tokens; the grid {self.grid} has {self.grid[0] * self.grid[1]}")
        h = x + self._pass(x, self.time)
        return h + self._pass(h, self.frequency) - x

    def _pass(self, x: Tensor, pattern) -> Tensor:
        q, k, v = self.attention.project(x, x)
        out, _ = attend(self.attention, q, k, v, pattern=pattern)
        return self.attention.combine(out, x)


class LongRangeGroupingAttention(nn.Module):
    """LRGT's intra-view then long-range grouping attention over ``views x tokens_per_view`` tokens
    (view-major), module docstring; ``groups`` must divide ``tokens_per_view``."""

    def __init__(self, dim: int, heads: int, views: int, tokens_per_view: int, groups: int, **options):
        super().__init__()
        if options.get("pattern") is not None:
            raise ShapeError("LongRangeGroupingAttention sets its own patterns; drop pattern=")
        self.views, self.per_view = _positive("views", views), _positive("tokens_per_view", tokens_per_view)
        self.groups = _positive("groups", groups)
        if tokens_per_view % groups:
            raise ShapeError(f"groups ({groups}) must divide tokens_per_view ({tokens_per_view})")
        self.dim = dim
        self.intra = MultiHeadAttention(dim, heads, pattern=BlockLocal(tokens_per_view), **options)
        self.inter = MultiHeadAttention(dim, heads, pattern=Dilated(views * tokens_per_view // groups, groups),
                                        **options)

    def forward(self, x: Tensor) -> Tensor:
        check_inputs(x, None, self.dim)
        if x.shape[1] != self.views * self.per_view:
            raise ShapeError(f"x has {x.shape[1]} tokens; built for {self.views} views x {self.per_view}")
        h = x + self.intra(x)
        return h + self.inter(h) - x
