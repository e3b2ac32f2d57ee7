"""Attention inside groups of tokens made by sorting: FlatFormer's flattened windows and Histoformer's
intensity bins.

``sorted_group_attention(q, k, v, order, group, across=False)`` permutes the tokens of every batch
element by ``order`` (a sort), runs ``multihead.attention`` with ``BlockLocal(group)`` - each run of
``group`` consecutive sorted tokens attends within itself - or, with ``across``, with
``Dilated(ceil(N / group), group)`` - the tokens holding the same rank in every group - and puts the
outputs back in the original order. Gradients flow through the gathers.

- ``FlattenedWindowAttention`` (Liu et al., 2023, "FlatFormer: Flattened Window Attention for
  Efficient Point Cloud Transformer", arXiv 2301.08739): against window attention on a point cloud,
  windows are not of equal shape but of equal size: points are sorted window by window (windows of
  side ``window`` on a 2-D grid of coordinates, in row-major window order along the layer's
  ``axis``, then by coordinate inside the window) and cut into groups of ``group`` points; each group
  attends within itself. ``axis`` alternates between layers and ``shift`` (half a window) shifts the
  windows, as FlatFormer alternates its sorts and shifts.
- ``HistogramAttention`` (Sun et al., 2024, "Restoring Images in Adverse Weather Conditions via
  Histogram Transformer", arXiv 2407.10172): against attention over positions, tokens are grouped by
  content: sorted by intensity (the mean of their features) and split into bins of ``group``
  tokens; half the heads attend within their bin (tokens of similar intensity), the other half
  across bins (``across``: the tokens holding the same rank in every bin). The abstract gives the
  idea (sort, bin, attend within and across bins); the paper's dynamic-range convolution and
  loss are not built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeError
from ..functional import attention
from ..patterns import BlockLocal, Dilated
from .attention import MultiHeadAttention, check_inputs


def _gather(x: Tensor, order: Tensor) -> Tensor:
    """``x`` ``(B, H, N, D)`` with tokens taken in ``order`` ``(B, N)``."""
    return x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def sorted_group_attention(q: Tensor, k: Tensor, v: Tensor, order: Tensor, group: int, *, across: bool = False,
                           scale: float | None = None, dropout: float = 0.0, backend: str = "auto") -> Tensor:
    """Self-attention inside groups of ``group`` consecutive tokens of the order ``order`` ``(B, N)`` (a
    permutation of the tokens per batch element); with ``across``, among the tokens at the same rank of
    every group instead (sorted position ``i`` meets ``i +- m * group``). Returns ``(B, H, N, Dv)`` in the
    original token order."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ShapeError(f"{name} must be a (batch, heads, tokens, head_dim) tensor")
    batch, _, length, _ = q.shape
    if k.shape[2] != length or v.shape[2] != length:
        raise ShapeError("sorted_group_attention is self-attention: q, k and v need one length")
    if not isinstance(order, Tensor) or order.shape != (batch, length) or order.dtype != torch.long:
        raise ShapeError(f"order must be a long tensor (batch, tokens) = {(batch, length)}, got "
                         f"{getattr(order, 'dtype', type(order).__name__)} {tuple(getattr(order, 'shape', ()))}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ShapeError(f"group must be a positive integer, got {group!r}")
    groups = -(-length // group)
    pattern = Dilated(groups, group) if across else BlockLocal(min(group, length))
    out = attention(_gather(q, order), _gather(k, order), _gather(v, order), pattern=pattern, scale=scale,
                    dropout=dropout, backend=backend)
    inverse = order.argsort(-1)
    return _gather(out, inverse)


def window_order(coords: Tensor, window: float, axis: int = 0, shift: float = 0.0) -> Tensor:
    """FlatFormer's window-based sort of points ``coords`` ``(B, N, 2)`` (x, y), lexicographic on
    (window index on the other axis, window index on ``axis``, coordinate on ``axis``, coordinate on the
    other axis), windows of side ``window`` shifted by ``shift``; ``axis`` 0 = x, 1 = y; ties keep the
    input order."""
    if not isinstance(coords, Tensor) or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ShapeError(f"coords must be (batch, points, 2) x, y coordinates, got {getattr(coords, 'shape', coords)!r}")
    if axis not in (0, 1):
        raise ShapeError(f"axis must be 0 (x-major) or 1 (y-major), got {axis!r}")
    if not window > 0:
        raise ShapeError(f"window must be positive, got {window!r}")
    cells = torch.floor((coords + shift) / window)
    major, minor = axis, 1 - axis
    # stable sorts from the least to the most significant key
    order = torch.arange(coords.shape[1], device=coords.device).expand(coords.shape[0], -1)
    for key in (coords[..., minor], coords[..., major], cells[..., major], cells[..., minor]):
        order = order.gather(1, key.gather(1, order).argsort(dim=1, stable=True))
    return order


class FlattenedWindowAttention(MultiHeadAttention):
    """FlatFormer's flattened window attention over points ``x`` ``(batch, points, dim)`` with
    coordinates ``coords`` ``(batch, points, 2)`` (module docstring). Without ``coords``, the tokens
    are taken as the cells of ``grid`` (row-major), for use as a token mixer on a square map."""

    pattern_restricts_mixing = False  # the groups come from the sort, not from ``pattern``

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, group: int, window: float,
                 axis: int = 0, shift: bool = False, grid: tuple[int, int] | None = None, **options):
        for name in ("pattern", "score", "normalizer", "kv_dim", "context_parallel", "position"):
            if options.get(name) is not None:
                raise ShapeError(f"FlattenedWindowAttention sets its own {name}; drop {name}=")
        super().__init__(dim, heads, kv_heads, **options)
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ShapeError(f"group must be a positive integer, got {group!r}")
        self.group, self.window, self.axis, self.shift, self.grid = group, window, axis, shift, grid
        window_order(torch.zeros(1, 1, 2), window, axis)  # checks window and axis

    def forward(self, x: Tensor, coords: Tensor | None = None) -> Tensor:
        check_inputs(x, None, self.dim)
        if coords is None:
            if self.grid is None or self.grid[0] * self.grid[1] != x.shape[1]:
                raise ShapeError(f"pass coords (batch, points, 2), or build the module with the grid of the "
                                 f"{x.shape[1]} tokens")
            ys, xs = torch.meshgrid(torch.arange(self.grid[0], device=x.device),
                                    torch.arange(self.grid[1], device=x.device), indexing="ij")
            coords = torch.stack([xs.flatten(), ys.flatten()], -1).to(x.dtype).expand(x.shape[0], -1, -1)
        order = window_order(coords, self.window, self.axis, self.window / 2 if self.shift else 0.0)
        q, k, v = self.project(x, x)
        out = sorted_group_attention(q, k, v, order, self.group, dropout=self.dropout if self.training else 0.0,
                                     backend=self.backend)
        return self.combine(out, x)


class HistogramAttention(MultiHeadAttention):
    """Histoformer-style attention over intensity bins (module docstring): tokens sorted by the mean of
    their features, bins of ``group`` tokens; the first half of the heads attend within their bin, the
    rest across bins (``heads >= 2``)."""

    pattern_restricts_mixing = False  # the bins come from the sort, not from ``pattern``

    def __init__(self, dim: int, heads: int, *, group: int, **options):
        for name in ("pattern", "score", "normalizer", "kv_dim", "context_parallel", "position", "kv_heads"):
            if options.get(name) is not None:
                raise ShapeError(f"HistogramAttention sets its own {name}; drop {name}=")
        if isinstance(heads, int) and heads < 2:
            raise ShapeError(f"HistogramAttention needs heads >= 2 (within- and across-bin heads), got {heads}")
        super().__init__(dim, heads, **options)
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ShapeError(f"group must be a positive integer, got {group!r}")
        self.group = group

    def order(self, x: Tensor) -> Tensor:
        """The tokens by ascending intensity (mean feature), ties in token order."""
        return x.detach().mean(-1).argsort(dim=-1, stable=True)

    def forward(self, x: Tensor) -> Tensor:
        check_inputs(x, None, self.dim)
        order = self.order(x)
        q, k, v = self.project(x, x)
        half = self.heads // 2
        options = dict(dropout=self.dropout if self.training else 0.0, backend=self.backend)
        within = sorted_group_attention(q[:, :half], k[:, :half], v[:, :half], order, self.group, **options)
        across = sorted_group_attention(q[:, half:], k[:, half:], v[:, half:], order, self.group, across=True,
                                        **options)
        return self.combine(torch.cat([within, across], 1), x)
