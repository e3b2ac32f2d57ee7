"""2-D relative position biases on a grid of tokens: Swin's learned table and CrossFormer's DPB.

Both add ``bias[h, dy, dx]`` to the logit of query ``(qy, qx)`` and key ``(ky, kx)``, with the
offset ``(dy, dx) = (qy - ky, qx - kx)`` (Swin's sign; tokens flattened row-major on ``grid``). The
table covers offsets ``|dy| < extent[0]``, ``|dx| < extent[1]`` - a window of ``extent`` tokens, as
Swin's ``(2M - 1) x (2M - 1)`` table for ``M x M`` windows; farther offsets share the table's edge
(as T5's farthest bucket), which a window pattern masks anyway. With a ``dilation`` the offset is
counted in its units, ``dy = qy // d - ky // d``: between two positions of one dilated sub-grid
(DiNAT's neighborhoods) that is ``(qy - ky) / d``.

The grid is either given at construction, or bound per call with ``score.on(grid)`` (what the
vision blocks do for inputs of any size). ``on`` evaluates the table once, for that call: the
learned table is the parameter itself, and the DPB's MLP runs once instead of inside every
``score_mod`` evaluation - which is also what lets FlexAttention compile it (inductor cannot lower a
matrix product inside a pointwise ``score_mod``). Call ``on`` in every forward pass, so the table
follows the parameters as they train.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..patterns.grid import coords
from .base import Score


def _pair(owner: str, name: str, value, minimum: int) -> tuple[int, int]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ShapeError(f"{owner}.{name} must be an int >= {minimum} or a pair of them (rows, columns), "
                         f"got {value!r}")
    return values


def relative_offsets(extent: tuple[int, int]) -> Tensor:
    """Every offset of the table, ``((2 * ey - 1) * (2 * ex - 1), 2)`` as ``(dy, dx)`` rows, row-major."""
    dy = torch.arange(-(extent[0] - 1), extent[0])
    dx = torch.arange(-(extent[1] - 1), extent[1])
    return torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).reshape(-1, 2)


class RelativeBias2d(Score):
    """Base of the 2-D biases: subclasses give ``table()``, ``(heads, 2 * ey - 1, 2 * ex - 1)``."""

    additive = True
    coded = True

    def __init__(self, heads: int, extent, grid=None, dilation=1):
        super().__init__()
        owner = type(self).__name__
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ShapeError(f"{owner}.heads must be a positive integer, got {heads!r}")
        self.num_heads = heads
        self.extent = _pair(owner, "extent", extent, 1)
        self.dilation = _pair(owner, "dilation", dilation, 1)
        self.grid = None if grid is None else _pair(owner, "grid", grid, 1)

    def table(self) -> Tensor:
        raise NotImplementedError

    def on(self, grid, dilation=None) -> Score:
        """This bias on ``grid`` (and ``dilation``, default the bias's own), with its table
        evaluated now: call it in every forward pass."""
        owner = type(self).__name__
        dilation = self.dilation if dilation is None else _pair(owner, "dilation", dilation, 1)
        return _OnGrid(self, _pair(owner, "grid", grid, 1), dilation, self.table())

    def linear_table(self, table: Tensor, grid, dilation):
        """``(covered, linear, center)`` with ``table[h, dy, dx]`` of positions ``q``, ``k`` equal to
        ``covered[h, center + linear(q) - linear(k)]``: the table padded (edge entries repeated) or
        cropped to every offset the grid has, flattened, so the index is linear in the coordinates."""
        span = [(n - 1) // d for n, d in zip(grid, dilation)]
        covered = _cover(table, [e - 1 for e in self.extent], span).flatten(1)
        stride = 2 * span[1] + 1

        def linear(idx: Tensor) -> Tensor:
            y, x = coords(idx, grid)
            return (y // dilation[0]) * stride + x // dilation[1]

        return covered, linear, span[0] * stride + span[1]

    def lookup(self, table: Tensor, score: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor, grid,
               dilation) -> Tensor:
        """``score + table[h, dy, dx]`` for the offsets of ``q_idx`` and ``kv_idx`` on ``grid``: one
        subtraction of two small tensors, then one gather, for the large ``(query, key)`` block."""
        covered, linear, center = self.linear_table(table, grid, dilation)
        index = linear(q_idx) - linear(kv_idx) + (center + h * covered.shape[1])
        # take: ~1.4x faster than covered[h, index]; long, as FlexAttention passes int32 indices
        return score + torch.take(covered, index.long()).to(score.dtype)

    def coded_form(self, table: Tensor, grid, dilation, kv_len: int):
        """``(codes, vector, center)`` of ``Score.coded`` for ``table`` on ``grid``: the codes are
        ``-linear(position)``, so ``center + codes[k] - codes[q]`` is the ``covered`` column."""
        covered, linear, center = self.linear_table(table, grid, dilation)
        return -linear(torch.arange(kv_len, device=table.device)), covered, center

    def native_form(self, kv_len: int):
        self._require_grid()
        return self.coded_form(self.table(), self.grid, self.dilation, kv_len)

    def _require_grid(self) -> None:
        if self.grid is None:
            raise ShapeError(f"{type(self).__name__} has no grid: build it with grid=(H, W), or pass "
                             f".on(grid) as the score")

    def forward(self, score, b, h, q_idx, kv_idx):
        self._require_grid()
        return self.lookup(self.table(), score, h, q_idx, kv_idx, self.grid, self.dilation)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, extent={self.extent}, dilation={self.dilation}, grid={self.grid}"


def _cover(table: Tensor, reach: list[int], span: list[int]) -> Tensor:
    """``table`` ``(heads, 2 * reach + 1, ...)`` re-centred to ``(heads, 2 * span + 1, ...)``:
    cropped where the span is shorter, padded with its edge entries where it is longer."""
    for axis, (r, s) in enumerate(zip(reach, span)):
        dim = axis + 1
        if s < r:
            table = table.narrow(dim, r - s, 2 * s + 1)
        elif s > r:
            edges = (table.narrow(dim, 0, 1), table.narrow(dim, 2 * r, 1))
            shape = list(table.shape)
            shape[dim] = s - r
            table = torch.cat([edges[0].expand(shape), table, edges[1].expand(shape)], dim=dim)
    return table


class _OnGrid(Score):
    """A ``RelativeBias2d`` bound to one grid, with its table evaluated for one call."""

    additive = True
    coded = True

    def __init__(self, bias: RelativeBias2d, grid: tuple[int, int], dilation: tuple[int, int], table: Tensor):
        super().__init__()
        self.grid, self.dilation, self.num_heads = grid, dilation, bias.num_heads
        self.table = table  # a tensor attribute: backends find it (and train it) as the score's input
        self._lookup = bias.lookup  # not a submodule: the table above is the only input
        self._coded_form = bias.coded_form

    def forward(self, score, b, h, q_idx, kv_idx):
        return self._lookup(self.table, score, h, q_idx, kv_idx, self.grid, self.dilation)

    def native_form(self, kv_len: int):
        return self._coded_form(self.table, self.grid, self.dilation, kv_len)

    def parameters(self, recurse: bool = True):
        """The one tensor this view trains: the table (the parameter itself, or the DPB's output,
        through which the MLP trains), so that backends see that the score needs gradients."""
        yield self.table

    def extra_repr(self) -> str:
        return f"grid={self.grid}, dilation={self.dilation}"


class RelativePositionBias2d(RelativeBias2d):
    """Swin's relative position bias (Liu et al., 2021, "Swin Transformer", arXiv 2103.14030).

    Adds a learned per-head scalar ``table[h, dy, dx]`` for the 2-D offset between query and key;
    the table has ``(2 * extent - 1)`` entries per axis (``extent`` = Swin's window ``M``, NAT's
    kernel). Initialized as Swin's (truncated normal, std 0.02); trains through every backend
    that serves scores.
    """

    def __init__(self, heads: int, extent, grid=None, dilation=1):
        super().__init__(heads, extent, grid, dilation)
        ey, ex = self.extent
        self.bias_table = nn.Parameter(torch.empty(heads, 2 * ey - 1, 2 * ex - 1))
        nn.init.trunc_normal_(self.bias_table, std=0.02)

    def table(self) -> Tensor:
        return self.bias_table


class DynamicPositionBias(RelativeBias2d):
    """CrossFormer's dynamic position bias (Wang et al., 2021, "CrossFormer", arXiv 2108.00154).

    Instead of a learned table, the bias of offset ``(dy, dx)`` is an MLP of the offset itself:
    ``Linear(2, d)``, then twice ``LayerNorm, ReLU, Linear(d, d)``, then ``LayerNorm, ReLU,
    Linear(d, heads)`` with ``d = hidden`` (CrossFormer uses a quarter of the model width). The
    MLP runs on the ``(2 * extent - 1)^2`` offsets of the table at every call, so the same
    parameters serve any window or grid size.
    """

    def __init__(self, heads: int, extent, grid=None, dilation=1, hidden: int = 32):
        super().__init__(heads, extent, grid, dilation)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ShapeError(f"DynamicPositionBias.hidden must be a positive integer, got {hidden!r}")
        self.hidden = hidden
        layers: list[nn.Module] = [nn.Linear(2, hidden)]
        for width in (hidden, hidden, heads):
            layers += [nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, width)]
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("offsets", relative_offsets(self.extent), persistent=False)

    def table(self) -> Tensor:
        weight = self.mlp[0].weight
        bias = self.mlp(self.offsets.to(weight.device, weight.dtype))
        ey, ex = self.extent
        return bias.t().reshape(self.num_heads, 2 * ey - 1, 2 * ex - 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", hidden={self.hidden}"
