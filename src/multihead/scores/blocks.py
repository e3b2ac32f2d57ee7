"""A bias per (query, key block): the score through which block-level mechanisms act on a softmax."""

from __future__ import annotations

from torch import Tensor

from ..errors import ShapeError
from .base import Score


class BlockBias(Score):
    """Adds ``table[b, h, i, j // block]`` to the logit of query row ``i`` and key ``j``.

    ``table`` is ``(B, H, q_len, ceil(kv_len / block))``; it may depend on q and k and require grad
    (Landmark Attention's log block weights), in which case backends differentiate through it.
    ``offset`` is ``kv_len - q_len``: scores receive query indices in the key frame.
    """

    additive = True
    batch_dependent = True

    def __init__(self, table: Tensor, block: int, offset: int = 0):
        super().__init__()
        if not isinstance(table, Tensor) or table.dim() != 4 or not table.is_floating_point():
            raise ShapeError(f"BlockBias.table must be a float tensor (B, H, q_len, blocks), got "
                             f"{getattr(table, 'shape', type(table).__name__)}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ShapeError(f"BlockBias.block must be a positive integer, got {block!r}")
        self.table, self.block, self.offset = table, block, int(offset)
        self.num_heads = table.shape[1]

    def forward(self, score, b, h, q_idx, kv_idx):
        return score + self.table[b, h, q_idx - self.offset, kv_idx // self.block].to(score.dtype)

    def extra_repr(self) -> str:
        return f"table={tuple(self.table.shape)}, block={self.block}"


class KeyBias(Score):
    """Adds ``table[b, h, j]`` to the logit of every query with key ``j``: a bias that depends on the
    key alone (Dynamic Mask Attention's value-derived mask). ``table`` is ``(B, H, kv_len)`` and may
    require grad."""

    additive = True
    batch_dependent = True

    def __init__(self, table: Tensor):
        super().__init__()
        if not isinstance(table, Tensor) or table.dim() != 3 or not table.is_floating_point():
            raise ShapeError(f"KeyBias.table must be a float tensor (B, H, kv_len), got "
                             f"{getattr(table, 'shape', type(table).__name__)}")
        self.table = table
        self.num_heads = table.shape[1]

    def forward(self, score, b, h, q_idx, kv_idx):
        return score + self.table[b, h, kv_idx].to(score.dtype)

    def extra_repr(self) -> str:
        return f"table={tuple(self.table.shape)}"
