"""Patterns that differ per head: a pattern per head, and CSWin's cross-shaped windows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PatternError
from .base import Pattern, _combined_extent, check_int
from .grid import check_grid_lengths, coords, normalize_grid
from .local import BlockLocal
from .spans import Spans


def _stack_heads(spans: list[Spans], kv_len: int) -> Spans:
    """Per-head spans ``(B', 1, q, k_h)`` stacked on the head axis, padded with empty intervals."""
    width = max(s.start.shape[-1] for s in spans)
    batch = max(s.start.shape[0] for s in spans)
    starts, ends = [], []
    for s in spans:
        pad = width - s.start.shape[-1]
        start = torch.nn.functional.pad(s.start, (0, pad))
        end = torch.nn.functional.pad(s.end, (0, pad))
        shape = (batch, s.start.shape[1], s.start.shape[2], width)
        starts.append(start.expand(shape))
        ends.append(end.expand(shape))
    return Spans(torch.cat(starts, 1), torch.cat(ends, 1), kv_len)


@dataclass(frozen=True)
class PerHead(Pattern):
    """Head ``h`` uses ``patterns[h]``: a different pattern per attention head.

    Instead of one pattern for all heads, the heads follow their own, as in models that mix local and
    global heads, or windows of different shapes (e.g. CSWin's stripes, ``CrossShapedWindow``). Sets
    ``num_heads = len(patterns)``. The parts may not themselves differ per head; they may differ per
    batch element (then they must agree on the batch size).
    """

    patterns: tuple[Pattern, ...]

    def __post_init__(self):
        patterns = self.patterns
        if isinstance(patterns, Pattern) or not isinstance(patterns, (tuple, list)) or not patterns:
            raise PatternError(
                f"PerHead.patterns must be a non-empty tuple of patterns, one per head, got "
                f"{patterns!r}")
        for i, p in enumerate(patterns):
            if not isinstance(p, Pattern):
                raise PatternError(
                    f"PerHead.patterns[{i}] must be a Pattern, got {type(p).__name__}")
            if p.num_heads is not None:
                raise PatternError(
                    f"PerHead.patterns[{i}] already differs per head ({p.num_heads} heads); give "
                    f"PerHead one head-independent pattern per head")
        object.__setattr__(self, "patterns", tuple(patterns))
        _combined_extent("batch size", (p.batch_size for p in self.patterns))

    @property
    def num_heads(self) -> int:
        return len(self.patterns)

    @property
    def batch_size(self) -> int | None:
        return _combined_extent("batch size", (p.batch_size for p in self.patterns))

    def check(self, q_len, kv_len):
        for p in self.patterns:
            p.check(q_len, kv_len)

    def mask_mod(self, b, h, q_idx, kv_idx):
        allowed = None
        for i, p in enumerate(self.patterns):
            ok = (h == i) & p.mask_mod(b, h, q_idx, kv_idx)
            allowed = ok if allowed is None else allowed | ok
        return allowed

    def _spans(self, q_pos, kv_len):
        return _stack_heads([p._spans(q_pos, kv_len) for p in self.patterns], kv_len)

    def head_groups(self):
        """Consecutive heads with equal patterns (the same object, or equal values) form one run."""
        runs: list[tuple[int, int, Pattern]] = []
        for h, p in enumerate(self.patterns):
            if runs and runs[-1][2] == p:  # patterns holding tensors compare by identity (eq=False)
                runs[-1] = (runs[-1][0], h + 1, runs[-1][2])
            else:
                runs.append((h, h + 1, p))
        return runs


@dataclass(frozen=True)
class CrossShapedWindow(Pattern):
    """CSWin's cross-shaped window attention on a 2-D grid (Dong et al., 2022, "CSWin Transformer").

    Instead of every key, the first half of the ``heads`` see the keys of their horizontal stripe
    (``stripe`` whole rows: rows ``[k * stripe, (k + 1) * stripe)``), the second half those of their
    vertical stripe (``stripe`` whole columns); together a token's heads cover a cross. A grid side
    that ``stripe`` does not divide ends in a narrower stripe. ``heads`` must be even (CSWin splits
    the heads into two equal groups), and ``1 <= stripe <= min(grid)``.
    """

    stripe: int
    grid: tuple[int, int]
    heads: int

    def __post_init__(self):
        grid = normalize_grid("CrossShapedWindow", self.grid, dims=(2,))
        check_int("CrossShapedWindow.heads", self.heads, minimum=2)
        if self.heads % 2:
            raise PatternError(
                f"CrossShapedWindow.heads={self.heads} must be even: half of the heads attend "
                f"within horizontal stripes and half within vertical ones")
        check_int("CrossShapedWindow.stripe", self.stripe, minimum=1)
        if self.stripe > min(grid):
            raise PatternError(
                f"CrossShapedWindow.stripe={self.stripe} exceeds the grid side {min(grid)} of "
                f"grid={grid}; use a stripe width between 1 and {min(grid)}")
        object.__setattr__(self, "grid", grid)

    @property
    def num_heads(self) -> int:
        return self.heads

    def check(self, q_len, kv_len):
        check_grid_lengths("CrossShapedWindow", self.grid, q_len, kv_len)

    def mask_mod(self, b, h, q_idx, kv_idx):
        (qy, qx), (ky, kx) = coords(q_idx, self.grid), coords(kv_idx, self.grid)
        same_row_stripe = qy // self.stripe == ky // self.stripe
        same_col_stripe = qx // self.stripe == kx // self.stripe
        horizontal = h < self.heads // 2
        return (horizontal & same_row_stripe) | (~horizontal & same_col_stripe)

    def _stripes(self) -> tuple[BlockLocal, BlockLocal]:
        """The horizontal and the vertical stripes, each a head-independent ``BlockLocal``."""
        rows, cols = self.grid
        return BlockLocal((self.stripe, cols), self.grid), BlockLocal((rows, self.stripe), self.grid)

    def _spans(self, q_pos, kv_len):
        half = self.heads // 2
        stacked = _stack_heads([p._spans(q_pos, kv_len) for p in self._stripes()], kv_len)
        return Spans(stacked.start.repeat_interleave(half, 1), stacked.end.repeat_interleave(half, 1),
                     kv_len)

    def key_counts(self, q_len, kv_len, device=None):
        """Each half's stripe counts (boxes), without building the stacked spans."""
        self._checked(q_len, kv_len)
        half = self.heads // 2
        counts = [p.key_counts(q_len, kv_len, device).expand(1, half, q_len) for p in self._stripes()]
        return torch.cat(counts, 1)

    def head_groups(self):
        half = self.heads // 2
        horizontal, vertical = self._stripes()
        return [(0, half, horizontal), (half, self.heads, vertical)]
