"""A local path and a pooled global path in one attention module, with named presets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..nn.attention import split_heads
from ..patterns import Neighborhood, ShiftedWindow
from ..patterns.base import check_int
from .base import GridAttention, check_feature_map

_POOLS = {"avg": F.avg_pool2d, "max": F.max_pool2d}
_LOCALS = ("window", "neighborhood")
_MIXES = ("heads", "sum", "gate")


class LocalGlobalAttention(GridAttention):
    """Local attention and pooled global attention side by side (the dual-path design of
    MAFormer, DuoFormer and TransNeXt's aggregated attention).

    Queries stay at full resolution. The **local** path attends within ``window``-sized windows
    (``local="window"``, Swin's partition) or a sliding ``window x window`` neighborhood
    (``local="neighborhood"``). The **global** path attends to every position of the map pooled by
    ``pool`` (``pooling="avg"`` or ``"max"``, ``ceil(H / pool) x ceil(W / pool)`` keys, the same k/v
    projections). ``mix`` combines them: ``"heads"`` - the first half of the heads take the local
    path, the rest the global one (outputs concatenated); ``"sum"`` - every head takes both and the
    two outputs add; ``"gate"`` - every head takes both, mixed per position and head by
    ``g = sigmoid(W x)``: ``g * local + (1 - g) * global`` (a learned, input-dependent fusion).
    Each path is its own softmax. Presets: ``maformer``, ``duoformer``, ``transnext``.
    """


    def __init__(self, dim: int, heads: int, window: int = 7, pool: int = 4, pooling: str = "avg",
                 mix: str = "gate", local: str = "window", **options):
        super().__init__(dim, heads, **options)
        check_int("LocalGlobalAttention.window", window, minimum=1)
        check_int("LocalGlobalAttention.pool", pool, minimum=1)
        for name, value, choices in (("pooling", pooling, tuple(_POOLS)), ("mix", mix, _MIXES),
                                     ("local", local, _LOCALS)):
            if value not in choices:
                raise ShapeError(f"LocalGlobalAttention.{name} must be one of {choices}, got {value!r}")
        if self.kv_heads != heads or (mix == "heads" and heads < 2):
            raise ShapeError(f"LocalGlobalAttention needs kv_heads == heads, and heads >= 2 with "
                             f"mix='heads' (got heads={heads}, kv_heads={self.kv_heads})")
        self.window, self.pool, self.pooling, self.mix, self.local = window, pool, pooling, mix, local
        self.gate = nn.Linear(dim, heads) if mix == "gate" else None
        self.refuse("score", "position")

    # -- presets (settings from the papers' descriptions; see docs/vision.md) -------------------
    @classmethod
    def maformer(cls, dim: int, heads: int, **options) -> "LocalGlobalAttention":
        """MAFormer's MAF block: 7x7 window branch, global branch on a down-sampled map, fused by
        a learned gate."""
        return cls(dim, heads, window=7, pool=4, pooling="avg", mix="gate", local="window", **options)

    @classmethod
    def duoformer(cls, dim: int, heads: int, **options) -> "LocalGlobalAttention":
        """DuoFormer: patch-wise (local window) and scale-wise (global, pooled) attention as
        separate heads."""
        return cls(dim, heads, window=7, pool=2, pooling="avg", mix="heads", local="window", **options)

    @classmethod
    def transnext(cls, dim: int, heads: int, **options) -> "LocalGlobalAttention":
        """A simplification of TransNeXt's aggregated attention: a 3x3 sliding neighborhood plus pooled
        global keys for every token, the two outputs added (the paper's form, one softmax over both
        with its logits and learnable tokens, is ``vision.AggregatedAttention``, catalog ``transnext``)."""
        return cls(dim, heads, window=3, pool=4, pooling="avg", mix="sum", local="neighborhood", **options)

    def pattern_for(self, grid):
        window = tuple(min(self.window, n) for n in grid)
        return ShiftedWindow(window, 0, grid) if self.local == "window" else Neighborhood(window, grid=grid)

    def _pooled(self, x: Tensor) -> Tensor:
        if self.pool == 1:
            return x.flatten(1, 2)
        pooled = _POOLS[self.pooling](x.permute(0, 3, 1, 2), self.pool, ceil_mode=True)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(batch, H, W, dim)`` -> the same shape."""
        grid = check_feature_map(x, self.dim, type(self).__name__)
        tokens = x.flatten(1, 2)
        q, k, v = self.project(tokens, tokens)
        pooled = self._pooled(x)
        k_global = split_heads(self.k_proj(pooled), self.heads)
        v_global = split_heads(self.v_proj(pooled), self.heads)
        dropout = self.dropout if self.training else 0.0

        def local(h: slice) -> Tensor:
            return attention(q[:, h], k[:, h], v[:, h], pattern=self.pattern_for(grid), dropout=dropout,
                             backend=self.backend)

        def global_(h: slice) -> Tensor:
            return attention(q[:, h], k_global[:, h], v_global[:, h], dropout=dropout, backend=self.backend)

        if self.mix == "heads":
            half = self.heads // 2
            out = torch.cat([local(slice(0, half)), global_(slice(half, None))], dim=1)
        else:
            near, far = local(slice(None)), global_(slice(None))
            if self.mix == "sum":
                out = near + far
            else:
                gate = torch.sigmoid(self.gate(tokens)).transpose(1, 2).unsqueeze(-1)
                out = gate * near + (1 - gate) * far
        return self.combine(out, tokens).view(x.shape)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", window={self.window}, pool={self.pool}, pooling={self.pooling!r}, "
                f"mix={self.mix!r}, local={self.local!r}")
