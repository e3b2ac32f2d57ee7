"""Block-level patterns: chosen key blocks per query (learned or retrieved sparsity) and landmarks.

- ``BlockSelection``: query row ``i`` sees the keys of the blocks listed for it, as intervals
  ``[g * block, g * block + size)``. What Landmark Attention's retrieval (top-k blocks per query)
  and SeerAttention's gate (key blocks per query block) resolve to; a backend reads its spans, so
  the block-sparse backend computes only the listed blocks.
- ``NoLandmarkKeys``: the landmark tokens (the last token of every complete block) are seen by no
  query, as in Landmark Attention where a landmark's weight gates its block instead of mixing in its
  value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import PatternError
from .base import Pattern, check_int
from .spans import Spans


@dataclass(frozen=True, eq=False)
class BlockSelection(Pattern):
    """Static pattern: query row ``i`` sees the keys ``[g * block, g * block + size)`` of every block
    ``g = blocks[b, h, i, j]`` with ``valid[b, h, i, j]``.

    ``blocks`` (integer) and ``valid`` (bool) have shape ``(B', H', q_len, k)`` (``B'``, ``H'`` 1 or the
    batch size / head count); ``kv_len`` is the key count and every listed block must lie in
    ``[0, ceil(kv_len / block))``; the last block may be shorter. ``size`` (default ``block``) keeps
    only the first ``size`` keys of each block (``block - 1`` skips a trailing landmark). The same
    block listed twice in a row counts once. Query rows are in the key frame's alignment
    (bottom-right, see ``multihead.patterns.base``) but indexed from 0 to ``q_len - 1``.
    """

    blocks: Tensor = field(repr=False)
    valid: Tensor = field(repr=False)
    block: int
    kv_len: int
    size: int | None = None
    pointwise = False  # mask_mod searches the row's list of blocks

    def __post_init__(self):
        check_int("BlockSelection.block", self.block, minimum=1)
        check_int("BlockSelection.kv_len", self.kv_len, minimum=1)
        if self.size is None:
            object.__setattr__(self, "size", self.block)
        check_int("BlockSelection.size", self.size, minimum=1)
        if self.size > self.block:
            raise PatternError(f"BlockSelection.size={self.size} exceeds block={self.block}; use 1..block")
        b, v = self.blocks, self.valid
        if not isinstance(b, Tensor) or not isinstance(v, Tensor) or b.shape != v.shape or b.dim() != 4:
            raise PatternError(f"BlockSelection needs blocks and valid of one shape (B, H, q_len, k), got "
                               f"{tuple(getattr(b, 'shape', ()))} and {tuple(getattr(v, 'shape', ()))}")
        if v.dtype != torch.bool or b.dtype not in (torch.int32, torch.int64):
            raise PatternError(f"BlockSelection needs integer blocks and boolean valid, got {b.dtype} and {v.dtype}")
        count = -(-self.kv_len // self.block)
        if b.numel() and (int(b.min()) < 0 or int(b.max()) >= count):
            raise PatternError(f"BlockSelection blocks must lie in [0, {count}) (kv_len={self.kv_len}, "
                               f"block={self.block}), in invalid slots too")

    @property
    def batch_size(self):
        return self.blocks.shape[0] if self.blocks.shape[0] > 1 else None

    @property
    def num_heads(self):
        return self.blocks.shape[1] if self.blocks.shape[1] > 1 else None

    def __repr__(self):
        return f"BlockSelection(k={self.blocks.shape[-1]}, block={self.block}, size={self.size})"

    def check(self, q_len, kv_len):
        if q_len != self.blocks.shape[2] or kv_len != self.kv_len:
            raise PatternError(f"{self!r} was made for q_len={self.blocks.shape[2]}, kv_len={self.kv_len}, "
                               f"not q_len={q_len}, kv_len={kv_len}")

    def mask_mod(self, b, h, q_idx, kv_idx):
        row = q_idx - (self.kv_len - self.blocks.shape[2])
        b = b if self.blocks.shape[0] > 1 else torch.zeros_like(b)
        h = h if self.blocks.shape[1] > 1 else torch.zeros_like(h)
        listed = self.blocks[b, h, row]  # (..., k)
        hit = (listed == (kv_idx // self.block).unsqueeze(-1)) & self.valid[b, h, row]
        return hit.any(-1) & (kv_idx % self.block < self.size)

    def _spans(self, q_pos, kv_len):
        start = self.blocks.to(q_pos.device).long() * self.block
        valid = self.valid.to(q_pos.device)
        start = torch.where(valid, start, torch.zeros_like(start))
        end = torch.where(valid, start + self.size, start)
        return Spans(start, end, kv_len)


@dataclass(frozen=True)
class NoLandmarkKeys(Pattern):
    """Every key except the landmarks: the last token of each complete block of ``block`` tokens
    (positions ``block - 1``, ``2 * block - 1``, ...) is seen by no query.

    Landmark Attention (Mohtashami & Jaggi, 2023) gives each landmark's attention weight to its
    block's tokens instead of mixing in the landmark's value; intersect with ``Causal()``.
    """

    block: int

    def __post_init__(self):
        check_int("NoLandmarkKeys.block", self.block, minimum=2)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx % self.block) != self.block - 1

    def _spans(self, q_pos, kv_len):
        count = -(-kv_len // self.block)
        start = torch.arange(count, device=q_pos.device) * self.block
        shape = (1, 1, q_pos.shape[0], count)
        return Spans(start.expand(shape), (start + self.block - 1).expand(shape), kv_len)
