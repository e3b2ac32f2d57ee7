"""The base of the vision blocks: multi-head attention on a ``(batch, H, W, channels)`` feature map.

Convention (one for every block of ``multihead.vision``): feature maps are channels-last,
``(batch, H, W, channels)``, as timm's Swin and NATTEN's modules; tokens are the ``H x W`` positions
flattened row-major (token ``y * W + x``), the order every grid pattern of ``multihead.patterns``
uses. A block builds its pattern (and its 2-D position score) for the grid of each input, so one
module serves every resolution its pattern allows.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..nn.attention import MultiHeadAttention
from ..patterns import Pattern
from ..scores import DynamicPositionBias, RelativeBias2d, RelativePositionBias2d, Score

#: The 2-D relative position biases a block may add, by name.
RELATIVE_BIASES = {"table": RelativePositionBias2d, "dynamic": DynamicPositionBias}


def make_relative_bias(owner: str, kind: str | None, heads: int, extent) -> RelativeBias2d | None:
    """``"table"`` (Swin's learned table), ``"dynamic"`` (CrossFormer's DPB) or None (no bias)."""
    if kind is None:
        return None
    if kind not in RELATIVE_BIASES:
        raise ShapeError(f"{owner}.relative_bias must be one of {list(RELATIVE_BIASES)} or None, got {kind!r}")
    return RELATIVE_BIASES[kind](heads, extent)


def check_feature_map(x: Tensor, dim: int, owner: str) -> tuple[int, int]:
    """The grid ``(H, W)`` of ``x``, which must be ``(batch, H, W, dim)``."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{owner} takes a channels-last feature map (batch, H, W, {dim}), got {shape}; "
                         f"permute a (batch, channels, H, W) image with x.permute(0, 2, 3, 1)")
    return x.shape[1], x.shape[2]


class GridAttention(MultiHeadAttention):
    """Multi-head attention over the positions of a ``(batch, H, W, dim)`` map, pattern per grid.

    Subclasses say which positions meet (``pattern_for(grid)``) and may add a 2-D position score
    (``grid_score(grid)``) or a term of their own on the values (``attend_grid``); the projections,
    the attention call (``multihead.attention``, any backend) and the output projection are
    ``MultiHeadAttention``'s. Keyword arguments go to ``MultiHeadAttention`` (``bias``, ``dropout``,
    ``backend``, ``head_dim``, ``kv_heads``, ``position``).
    """

    pattern_restricts_mixing = False  # grid blocks build their pattern per map

    def __init__(self, dim: int, heads: int, **options):
        if options.get("pattern") is not None and type(self).pattern_for is not GridAttention.pattern_for:
            raise ShapeError(f"{type(self).__name__} builds its own pattern for each map; do not pass "
                             f"pattern= (use GridAttention for a pattern of your own)")
        super().__init__(dim, heads, **options)

    def refuse(self, *names: str) -> None:
        """Raise if any of ``names`` (module options this block has no use for) was given."""
        given = [n for n in names if getattr(self, n, None) is not None]
        if given:
            raise ShapeError(f"{type(self).__name__} does not take {', '.join(n + '=' for n in given)}: "
                             f"its attention has no place for it")

    def pattern_for(self, grid: tuple[int, int]) -> Pattern | None:
        """The pattern on ``grid``: here the module's ``pattern`` (None: all positions meet)."""
        return self.pattern

    def grid_score(self, grid: tuple[int, int]) -> Score | list[Score] | None:
        """The score on ``grid``: the block's 2-D ``relative_bias`` bound to it, if it has one,
        then the module's ``score``."""
        terms = [t for t in (self.bound_bias(grid), self.score) if t is not None]
        return terms or None

    def bound_bias(self, grid: tuple[int, int]) -> Score | None:
        """The block's 2-D ``relative_bias`` bound to ``grid`` (None without one)."""
        bias = getattr(self, "relative_bias", None)
        return None if bias is None else bias.on(grid)

    def attend_grid(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int],
                    need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-head outputs ``(B, heads, H * W, head_dim)`` (and weights) for the map's ``q, k, v``."""
        result = attention(q, k, v, pattern=self.pattern_for(grid), score=self.grid_score(grid),
                           dropout=self.dropout if self.training else 0.0, backend=self.backend,
                           return_weights=need_weights, **self.attention_options())
        return result if need_weights else (result, None)

    def forward(self, x: Tensor, *, need_weights: bool = False):
        """``x`` ``(batch, H, W, dim)`` -> the same shape; with ``need_weights`` also the per-head
        weights ``(batch, heads, H * W, H * W)`` (reference backend)."""
        grid = check_feature_map(x, self.dim, type(self).__name__)
        tokens = x.flatten(1, 2)
        q, k, v = self.project(tokens, tokens)
        out, weights = self.attend_grid(q, k, v, grid, need_weights)
        y = self.combine(out, tokens).view(x.shape)
        return (y, weights) if need_weights else y


class OnTokens(nn.Module):
    """A feature-map block on token sequences ``(batch, H * W, dim)`` of a fixed ``grid``.

    What the catalog builds for the vision blocks, so that the benchmark, the arena and
    ``TransformerBlock`` run them like any other variant.
    """

    def __init__(self, block: nn.Module, grid: tuple[int, int]):
        super().__init__()
        self.block, self.grid = block, tuple(grid)

    def forward(self, x: Tensor) -> Tensor:
        rows, cols = self.grid
        if x.dim() != 3 or x.shape[1] != rows * cols:
            raise ShapeError(f"{type(self.block).__name__} on grid {self.grid} takes (batch, {rows * cols}, "
                             f"dim) tokens, got {tuple(x.shape)}")
        return self.block(x.view(x.shape[0], rows, cols, x.shape[-1])).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"
