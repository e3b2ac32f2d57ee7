"""The pattern base class and its combinators.

A pattern decides which (query, key) pairs may meet. It is an immutable value that gives

1. ``mask_mod(b, h, q_idx, kv_idx) -> bool`` - the predicate FlexAttention and Hugging Face use,
   elementwise and broadcasting over its index tensors;
2. ``dense_mask(q_len, kv_len)`` - that predicate evaluated on the whole grid (for the reference);
3. ``spans(q_len, kv_len)`` - the allowed keys of each query as a few intervals, computed
   analytically, from which ``block_layout`` derives which key blocks each query block needs.

Alignment when query and key lengths differ: query ``i`` sits at key position
``i + kv_len - q_len`` (bottom-right, as in FlashAttention and KV-cache decoding), so the last query
is always aligned with the last key. ``mask_mod`` itself takes indices in that shared frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PatternError
from .spans import BlockLayout, Spans


def check_int(name: str, value, *, minimum: int) -> None:
    """Raise a ``PatternError`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PatternError(f"{name} must be an integer >= {minimum}, got {value!r}")


class Pattern:
    """Which (query, key) pairs may meet. Subclasses are frozen dataclasses.

    Subclasses implement ``mask_mod`` and ``_spans``; they may override ``check`` to reject lengths
    they cannot serve, and set ``batch_size`` / ``num_heads`` when they differ per batch element or
    per head.
    """

    #: Batch elements the pattern distinguishes (None: the same for all).
    batch_size: int | None = None
    #: Heads the pattern distinguishes (None: the same for all).
    num_heads: int | None = None
    #: Whether the pattern depends on q and k (``multihead.patterns.dynamic``).
    dynamic: bool = False
    #: Whether ``mask_mod`` depends only on ``kv_idx - q_idx`` (Full, Causal, SlidingWindow): the
    #: pattern is then the same in a packed document's own frame and in the packed stream's.
    shift_invariant: bool = False
    #: Whether the pattern cuts the sequence into segments with frames of their own (``Documents``):
    #: intersected with it, the other patterns apply inside each segment (its ``localize``).
    segments: bool = False
    #: Whether ``mask_mod`` is elementwise with no reduction (what FlexAttention can compile).
    pointwise: bool = True

    def mask_mod(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        raise NotImplementedError

    def _spans(self, q_pos: Tensor, kv_len: int) -> Spans:
        """Spans for query positions ``q_pos`` (key frame, shape ``(q_len,)``)."""
        raise NotImplementedError

    def check(self, q_len: int, kv_len: int) -> None:
        """Raise a ``PatternError`` if the pattern cannot apply to these lengths."""

    def head_groups(self) -> list[tuple[int, int, "Pattern"]] | None:
        """For a pattern that differs per head: runs ``(h0, h1, pattern)`` of consecutive heads that
        share one head-independent pattern, covering all ``num_heads`` heads in order (CSWin's two
        stripe directions), so that a backend may run each run of heads on its own; None when the
        pattern is the same for every head or its heads do not fall into such runs."""
        return None

    def key_lists(self) -> tuple[Tensor, Tensor] | None:
        """Explicit keys of every query, ``(indices, valid)`` of shape ``(B', H', q_len, k)``, when
        the pattern is given that way (``KeySelection``); None otherwise."""
        return None

    def frame_runs(self) -> tuple[Tensor, bool] | None:
        """The pattern as runs of its frame, where each query sees the keys of its own run: all of
        them, or (``causal``) those up to itself; ``(lengths (B', H', R), causal)`` with the runs of
        each (batch, head) in frame order (Routing's clusters), or None when it is not of that form."""
        return None

    def tiling_box(self):
        """A ``grid.BoxPattern`` on a grid of 2 or more axes that allows every pair this pattern
        allows (itself, or a part of an intersection), so that a block-sparse backend may visit the
        grid in tiles and gather each tile's box of keys; None when there is none."""
        return None

    # -- derived forms -------------------------------------------------------------------------
    def _checked(self, q_len: int, kv_len: int) -> None:
        check_int("q_len", q_len, minimum=1)
        check_int("kv_len", kv_len, minimum=1)
        self.check(q_len, kv_len)

    def aligned_mask_mod(self, q_len: int, kv_len: int):
        """``mask_mod`` taking query indices ``0..q_len-1`` (shifted into the key frame)."""
        offset = kv_len - q_len
        if offset == 0:
            return self.mask_mod
        return lambda b, h, q_idx, kv_idx: self.mask_mod(b, h, q_idx + offset, kv_idx)

    def spans(self, q_len: int, kv_len: int, device=None) -> Spans:
        self._checked(q_len, kv_len)
        q_pos = torch.arange(q_len, device=device) + (kv_len - q_len)
        return self._spans(q_pos, kv_len)

    def dense_mask(self, q_len: int, kv_len: int, device=None) -> Tensor:
        """The predicate on every pair: bool tensor ``(B', H', q_len, kv_len)``, True = may attend."""
        self._checked(q_len, kv_len)
        b = torch.arange(self.batch_size or 1, device=device).view(-1, 1, 1, 1)
        h = torch.arange(self.num_heads or 1, device=device).view(1, -1, 1, 1)
        q = torch.arange(q_len, device=device).view(1, 1, -1, 1)
        kv = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
        mask = self.aligned_mask_mod(q_len, kv_len)(b, h, q, kv)
        return mask.expand(b.shape[0], h.shape[1], q_len, kv_len)

    def block_layout(self, q_len: int, kv_len: int, q_block: int = 64, kv_block: int = 64,
                     device=None) -> BlockLayout:
        """Which key blocks each query block needs (full or partial), without an N x N scan."""
        check_int("q_block", q_block, minimum=1)
        check_int("kv_block", kv_block, minimum=1)
        return self.spans(q_len, kv_len, device).block_layout(q_block, kv_block)

    def key_counts(self, q_len: int, kv_len: int, device=None) -> Tensor:
        """How many keys each query row may see, ``(B', H', q_len)`` (0: an empty row)."""
        return self.spans(q_len, kv_len, device).counts()

    def empty_rows(self, q_len: int, kv_len: int, device=None) -> Tensor:
        """Which query rows may see no key, ``(B', H', q_len)`` bool."""
        return self.key_counts(q_len, kv_len, device) == 0

    def density(self, q_len: int, kv_len: int, device=None) -> float:
        """Fraction of all (query, key) pairs that are allowed."""
        counts = self.key_counts(q_len, kv_len, device)
        return counts.double().mean().item() / kv_len

    # -- combinators ---------------------------------------------------------------------------
    def __and__(self, other: "Pattern") -> "Pattern":
        return Intersection.of(self, other)

    def __or__(self, other: "Pattern") -> "Pattern":
        return Union.of(self, other)


def _combined_extent(name: str, values) -> int | None:
    sizes = {v for v in values if v is not None}
    if len(sizes) > 1:
        raise PatternError(f"combined patterns disagree on {name}: {sorted(sizes)}")
    return sizes.pop() if sizes else None


@dataclass(frozen=True)
class _Combination(Pattern):
    parts: tuple[Pattern, ...]

    @classmethod
    def of(cls, *patterns: Pattern) -> "Pattern":
        parts: list[Pattern] = []
        for p in patterns:
            if not isinstance(p, Pattern):
                raise PatternError(f"can only combine patterns, got {type(p).__name__}")
            if p.dynamic and cls is Union:
                raise PatternError(f"{p!r} depends on q and k; it can be intersected (&) with static "
                                   f"patterns, not united (|)")
            parts.extend(p.parts if isinstance(p, cls) else (p,))
        owners = [p for p in parts if p.segments] if cls is Intersection else []
        if owners:
            return owners[0].localize(*(p for p in parts if p is not owners[0]))
        return cls(tuple(parts))

    @property
    def batch_size(self) -> int | None:
        return _combined_extent("batch size", (p.batch_size for p in self.parts))

    @property
    def num_heads(self) -> int | None:
        return _combined_extent("head count", (p.num_heads for p in self.parts))

    @property
    def pointwise(self) -> bool:
        return all(p.pointwise for p in self.parts)

    @property
    def dynamic(self) -> bool:
        return any(p.dynamic for p in self.parts)

    @property
    def shift_invariant(self) -> bool:
        return all(p.shift_invariant for p in self.parts)

    def check(self, q_len: int, kv_len: int) -> None:
        for p in self.parts:
            p.check(q_len, kv_len)

    def head_groups(self):
        """The runs of heads where every per-head part is constant, each combining those parts'
        patterns with the head-independent parts."""
        runs = [None if p.num_heads is None else p.head_groups() for p in self.parts]
        if all(r is None for r in runs) or any(r is None and p.num_heads is not None
                                               for r, p in zip(runs, self.parts)):
            return None
        cuts = sorted({c for r in runs if r for h0, h1, _ in r for c in (h0, h1)})
        return [(h0, h1, type(self).of(*(p if r is None else next(q for a, b, q in r if a <= h0 < b)
                                         for p, r in zip(self.parts, runs))))
                for h0, h1 in zip(cuts, cuts[1:])]

    def __repr__(self) -> str:
        return "(" + f" {self.symbol} ".join(map(repr, self.parts)) + ")"


@dataclass(frozen=True, repr=False)
class Intersection(_Combination):
    """Pairs allowed by every part (``a & b``)."""

    symbol = "&"

    def tiling_box(self):
        return next((box for box in (p.tiling_box() for p in self.parts) if box is not None), None)

    def mask_mod(self, b, h, q_idx, kv_idx):
        result = self.parts[0].mask_mod(b, h, q_idx, kv_idx)
        for p in self.parts[1:]:
            result = result & p.mask_mod(b, h, q_idx, kv_idx)
        return result

    def _spans(self, q_pos, kv_len):
        result = self.parts[0]._spans(q_pos, kv_len)
        for p in self.parts[1:]:
            result = result & p._spans(q_pos, kv_len)
        return result


@dataclass(frozen=True, repr=False)
class Union(_Combination):
    """Pairs allowed by any part (``a | b``)."""

    symbol = "|"

    def mask_mod(self, b, h, q_idx, kv_idx):
        result = self.parts[0].mask_mod(b, h, q_idx, kv_idx)
        for p in self.parts[1:]:
            result = result | p.mask_mod(b, h, q_idx, kv_idx)
        return result

    def _spans(self, q_pos, kv_len):
        result = self.parts[0]._spans(q_pos, kv_len)
        for p in self.parts[1:]:
            result = result | p._spans(q_pos, kv_len)
        return result
