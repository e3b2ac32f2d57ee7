"""Row spans: the exact, compact form of a structured pattern, and the block layout derived from it.

For every query row a structured pattern allows a union of a few half-open key intervals
``[start, end)``. Intersections and unions of patterns stay unions of intervals, so the spans of
``A & B`` and ``A | B`` are exact. From the spans we derive, in O(rows x spans + blocks) work and
never an ``N x N`` scan, the number of allowed pairs in every (query block, key block) tile; that
gives the block layout (which tiles to skip, which need a mask, which are full) and the count of
keys each query sees (an empty row is an error).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class Spans:
    """Per query row, the allowed keys as a union of intervals.

    ``start`` and ``end`` are int64 tensors of shape ``(B', H', q_len, k)``, where ``B'`` is 1 or the
    batch size and ``H'`` is 1 or the head count; interval ``[start, end)`` is empty when
    ``end <= start``. Values are clamped to ``[0, kv_len]``.
    """

    start: Tensor
    end: Tensor
    kv_len: int

    def __post_init__(self):
        object.__setattr__(self, "start", self.start.clamp(0, self.kv_len))
        object.__setattr__(self, "end", self.end.clamp(0, self.kv_len))

    @classmethod
    def interval(cls, start: Tensor, end: Tensor, kv_len: int) -> "Spans":
        """One interval per query row, from ``(q_len,)`` or ``(B', H', q_len)`` tensors."""
        while start.dim() < 3:
            start = start.unsqueeze(0)
        while end.dim() < 3:
            end = end.unsqueeze(0)
        start, end = torch.broadcast_tensors(start, end)
        return cls(start.unsqueeze(-1), end.unsqueeze(-1), kv_len)

    @property
    def q_len(self) -> int:
        return self.start.shape[-2]

    def _drop_empty_slots(self) -> "Spans":
        """Remove interval slots that are empty in every row (keeps at least one)."""
        used = (self.end > self.start).flatten(0, -2).any(0)
        if used.all() or self.start.shape[-1] == 1:
            return self
        keep = used.nonzero().flatten()
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long, device=self.start.device)
        return Spans(self.start[..., keep], self.end[..., keep], self.kv_len)

    def __and__(self, other: "Spans") -> "Spans":
        start = torch.maximum(self.start.unsqueeze(-1), other.start.unsqueeze(-2)).flatten(-2)
        end = torch.minimum(self.end.unsqueeze(-1), other.end.unsqueeze(-2)).flatten(-2)
        return Spans(start, end, self.kv_len)._drop_empty_slots()

    def __or__(self, other: "Spans") -> "Spans":
        lead = torch.broadcast_shapes(self.start.shape[:-1], other.start.shape[:-1])
        parts = [t.expand(*lead, t.shape[-1]) for t in (self.start, other.start)]
        ends = [t.expand(*lead, t.shape[-1]) for t in (self.end, other.end)]
        return Spans(torch.cat(parts, -1), torch.cat(ends, -1), self.kv_len)._drop_empty_slots()

    @cached_property
    def disjoint(self) -> "Spans":
        """The same sets as disjoint intervals (sorted by start; overlaps cut away)."""
        if self.start.shape[-1] == 1:
            return self
        empty = self.end <= self.start
        start = self.start.masked_fill(empty, self.kv_len)
        end = self.end.masked_fill(empty, self.kv_len)
        start, order = start.sort(-1)
        end = end.gather(-1, order)
        covered_before = torch.cat([torch.zeros_like(end[..., :1]), end.cummax(-1).values[..., :-1]], -1)
        return Spans(torch.maximum(start, covered_before), end, self.kv_len)

    def counts(self) -> Tensor:
        """Number of allowed keys for every query row, shape ``(B', H', q_len)``."""
        d = self.disjoint
        return (d.end - d.start).clamp(min=0).sum(-1)

    def mask(self) -> Tensor:
        """The dense boolean mask ``(B', H', q_len, kv_len)`` these spans describe."""
        kv = torch.arange(self.kv_len, device=self.start.device)
        inside = (kv >= self.start.unsqueeze(-1)) & (kv < self.end.unsqueeze(-1))
        return inside.any(-2)

    def block_counts(self, q_block: int, kv_block: int) -> Tensor:
        """Allowed pairs in every (query block, key block) tile, shape ``(B', H', nq, nk)``.

        Each disjoint interval adds its overlap to the first and last key block it touches and a
        whole block to every block strictly between them (through a difference array), so the work
        is linear in rows x intervals plus the number of tiles.
        """
        d = self.disjoint
        start, end = d.start, d.end
        lead, q_len = start.shape[:2], start.shape[2]
        nq, nk = _ceil_div(q_len, q_block), _ceil_div(self.kv_len, kv_block)
        valid = end > start
        first = start // kv_block
        last = (end - 1).clamp(min=0) // kv_block
        same = first == last
        row_block = (torch.arange(q_len, device=start.device) // q_block).view(1, 1, -1, 1)
        base = row_block * (nk + 1)

        counts = torch.zeros(*lead, nq * (nk + 1), dtype=torch.long, device=start.device)
        interior = torch.zeros_like(counts)

        def add(target: Tensor, block: Tensor, amount: Tensor) -> None:
            index = (base + block.clamp(0, nk)).expand_as(amount).flatten(2)
            target.scatter_add_(-1, index, (amount * valid).flatten(2))

        add(counts, first, torch.where(same, end - start, (first + 1) * kv_block - start))
        add(counts, last, torch.where(same, torch.zeros_like(end), end - last * kv_block))
        spread = (~same).long() * kv_block
        add(interior, first + 1, spread)
        add(interior, last, -spread)
        counts = counts.view(*lead, nq, nk + 1) + interior.view(*lead, nq, nk + 1).cumsum(-1)
        return counts[..., :nk]

    def block_layout(self, q_block: int, kv_block: int) -> "BlockLayout":
        return BlockLayout.from_counts(self.block_counts(q_block, kv_block), self.q_len, self.kv_len,
                                       q_block, kv_block)


# Tile states in a block layout.
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which key blocks every query block needs, and whether each is full or needs a mask.

    ``state`` has shape ``(B', H', num_q_blocks, num_kv_blocks)`` with values ``EMPTY`` (no allowed
    pair: skip), ``PARTIAL`` (some pairs allowed: apply the mask) and ``FULL`` (every pair allowed:
    no mask). Blocks at the ends of the sequences may be shorter than the block size.
    """

    state: Tensor
    q_len: int
    kv_len: int
    q_block: int
    kv_block: int

    @classmethod
    def from_counts(cls, counts: Tensor, q_len: int, kv_len: int, q_block: int,
                    kv_block: int) -> "BlockLayout":
        nq, nk = counts.shape[-2:]
        device = counts.device
        rows = (q_len - torch.arange(nq, device=device) * q_block).clamp(max=q_block)
        keys = (kv_len - torch.arange(nk, device=device) * kv_block).clamp(max=kv_block)
        capacity = rows[:, None] * keys[None, :]
        state = torch.where(counts == 0, EMPTY, torch.where(counts == capacity, FULL, PARTIAL))
        return cls(state.to(torch.int8), q_len, kv_len, q_block, kv_block)

    @classmethod
    def from_mask(cls, mask: Tensor, q_block: int, kv_block: int) -> "BlockLayout":
        """Brute-force layout from a dense boolean mask ``(..., q_len, kv_len)`` (for tests)."""
        q_len, kv_len = mask.shape[-2:]
        nq, nk = _ceil_div(q_len, q_block), _ceil_div(kv_len, kv_block)
        padded = torch.zeros(*mask.shape[:-2], nq * q_block, nk * kv_block, dtype=torch.long,
                             device=mask.device)
        padded[..., :q_len, :kv_len] = mask.long()
        counts = padded.view(*mask.shape[:-2], nq, q_block, nk, kv_block).sum((-3, -1))
        while counts.dim() < 4:
            counts = counts.unsqueeze(0)
        return cls.from_counts(counts, q_len, kv_len, q_block, kv_block)

    @property
    def num_blocks(self) -> tuple[int, int]:
        return tuple(self.state.shape[-2:])

    @property
    def block_density(self) -> float:
        """Fraction of tiles that must be computed."""
        return (self.state != EMPTY).float().mean().item()

    def kv_blocks(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per query block: ``(count, indices, is_full)`` of the key blocks it needs.

        ``indices`` and ``is_full`` have shape ``(B', H', num_q_blocks, max_count)``, ascending, and
        are padded past ``count`` with index 0 and ``False`` (the layout FlexAttention's
        ``BlockMask`` uses).
        """
        needed = self.state != EMPTY
        count = needed.sum(-1)
        width = max(int(count.max().item()), 1)
        order = torch.sort(needed.to(torch.int8), dim=-1, descending=True, stable=True).indices
        indices = order[..., :width]
        in_range = torch.arange(width, device=self.state.device) < count.unsqueeze(-1)
        indices = torch.where(in_range, indices, torch.zeros_like(indices))
        is_full = (self.state.gather(-1, indices) == FULL) & in_range
        return count, indices, is_full
