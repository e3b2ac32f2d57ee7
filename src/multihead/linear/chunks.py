"""Packed sequences cut into fixed-size chunks: the layout every chunked form runs on.

Tokens arrive as ``(batch, heads, tokens, d)``; the batch is folded into one packed stream
``(heads, total, d)`` with sequence boundaries (FlashAttention's ``cu_seqlens``: ``[0, end_1, ...,
total]``). Each sequence is cut into chunks of ``chunk`` tokens; its last chunk is padded with zero
tokens, so that no chunk straddles two sequences. A zero token is a no-op for every recurrence here
(zero key and value, zero log-decay), so padding changes nothing but the work.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

from ..errors import ShapeError

SLAB_ELEMENTS = 1 << 21
"""Default size of a slab, in elements of its largest per-token temporary (``heads x tokens x
max(chunk, d)``): 8 MiB in float32, so a slab's temporaries stay in cache and are reused by the
allocator instead of being mapped afresh (page faults made whole-sequence passes 1.8x slower at
64k tokens)."""


def sequence_bounds(batch: int, tokens: int, cu_seqlens: Tensor | None) -> list[int]:
    """Boundaries of the packed sequences: ``cu_seqlens`` checked, or one sequence per batch row."""
    if cu_seqlens is None:
        return [row * tokens for row in range(batch + 1)]
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise ShapeError("cu_seqlens must be a 1-D integer tensor [0, end_1, ..., total] (FlashAttention's "
                         "convention)")
    if batch != 1:
        raise ShapeError(f"with cu_seqlens the sequences are packed along the tokens: batch must be 1, got {batch}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != tokens:
        raise ShapeError(f"cu_seqlens must start at 0 and end at the number of tokens ({tokens}), got {bounds}")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ShapeError(f"cu_seqlens must be non-decreasing, got {bounds}")
    return bounds


def with_ones(v: Tensor) -> Tensor:
    """``v`` with a column of ones appended (``(..., d)`` -> ``(..., d + 1)``): a state over it also
    carries the sum of the weights, the normaliser."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)


def normalized(sums: Tensor, eps: float = 0.0) -> Tensor:
    """Outputs over ``with_ones(v)`` divided by their last column (+ ``eps``), which is dropped."""
    return sums[..., :-1] / (sums[..., -1:] + eps)


def fold_batch(x: Tensor) -> Tensor:
    """``(batch, heads, tokens, ...)`` -> ``(heads, batch * tokens, ...)``."""
    return x.transpose(0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])


def unfold_batch(x: Tensor, batch: int) -> Tensor:
    """``(heads, batch * tokens, ...)`` -> ``(batch, heads, tokens, ...)``."""
    return x.reshape(x.shape[0], batch, x.shape[1] // batch, *x.shape[2:]).transpose(0, 1)


class ChunkLayout:
    """Sequences ``bounds`` cut into chunks of ``chunk`` tokens (the last one of each padded).

    ``starts[c]``: chunk ``c`` opens its sequence; ``sequence[c]``: the sequence it belongs to;
    ``last[s]``: the last chunk of sequence ``s`` (-1 for an empty sequence); ``valid``: which of the
    ``(chunks, chunk)`` slots hold real tokens.
    """

    def __init__(self, bounds: list[int], chunk: int, device: torch.device):
        _check_positive("chunk_size", chunk)
        self.chunk, self.total = chunk, bounds[-1]
        counts = [-(-(end - start) // chunk) for start, end in zip(bounds[:-1], bounds[1:])]
        self.chunks = sum(counts)
        starts, sequence, self.last, index = [], [], [], []
        for s, (start, end, count) in enumerate(zip(bounds[:-1], bounds[1:], counts)):
            starts += [True] + [False] * (count - 1) if count else []
            sequence += [s] * count
            self.last.append(len(sequence) - 1 if count else -1)
            slots = torch.arange(start, start + count * chunk)
            index.append(torch.where(slots < end, slots, self.total))  # padding reads the zero row
        self.starts = torch.tensor(starts, dtype=torch.bool)
        self.sequence = torch.tensor(sequence, dtype=torch.long, device=device)
        index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        self.padded = self.chunks * chunk != self.total
        self.valid = (index < self.total).view(self.chunks, chunk).to(device)
        # Where each token sits in the chunked layout (to scatter outputs back), and what to gather.
        self.index = index.to(device) if self.padded else None
        self.position = (index < self.total).nonzero().squeeze(1).to(device) if self.padded else None

    def gather(self, x: Tensor) -> Tensor:
        """``(heads, total, ...)`` -> ``(heads, chunks, chunk, ...)``, padding slots zero."""
        if self.padded:
            zero = x.new_zeros(x.shape[0], 1, *x.shape[2:])
            x = torch.cat([x, zero], 1).index_select(1, self.index)
        return x.reshape(x.shape[0], self.chunks, self.chunk, *x.shape[2:])

    def scatter(self, y: Tensor) -> Tensor:
        """``(heads, chunks, chunk, ...)`` -> ``(heads, total, ...)``, padding slots dropped."""
        y = y.reshape(y.shape[0], self.chunks * self.chunk, *y.shape[3:])
        return y.index_select(1, self.position) if self.padded else y


def slab_tokens(slab_size: int | None, heads: int, chunk: int, width: int) -> int:
    """Tokens per slab: ``slab_size`` checked, or the default that bounds a slab's temporaries."""
    _check_positive("chunk_size", chunk)
    if slab_size is None:
        return max(chunk, SLAB_ELEMENTS // (max(heads, 1) * max(chunk, width)) // chunk * chunk)
    _check_positive("slab_size", slab_size)
    return slab_size


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")


def in_slabs(run: Callable, streams: tuple, bounds: list[int], initial, slab: int):
    """``run(streams, bounds, initial) -> (out, final)`` on consecutive slabs of at most ``slab``
    packed tokens, each sequence's state carried across slab ends: the result of one call on the
    whole stream, in time and memory that grow by whole slabs.

    ``streams`` are ``(heads, total, ...)`` tensors (or None), cut along dim 1; states are tensors,
    or tuples of them, with dim 1 over sequences (``initial`` for every sequence). ``out`` pieces
    are joined along dim 1 and the final state holds every sequence's last state (its initial one
    if it is empty).
    """
    total = bounds[-1]
    if total <= slab:
        return run(streams, bounds, initial)
    state, outputs = initial, []
    for start in range(0, total, slab):
        end = min(start + slab, total)
        # the sequences with tokens in [start, end), and the empty ones strictly inside it
        lo, hi = max(0, bisect.bisect_right(bounds, start) - 1), bisect.bisect_left(bounds, end)
        inside = [s for s in range(lo, min(hi, len(bounds) - 1)) if bounds[s] < end and bounds[s + 1] > start]
        local = [max(bounds[s], start) - start for s in inside] + [min(bounds[inside[-1] + 1], end) - start]
        ids = torch.tensor(inside, device=tree_leaves(initial)[0].device)
        piece = tuple(None if x is None else x[:, start:end] for x in streams)
        out, final = run(piece, local, tree_map(lambda t: t.index_select(1, ids), state))
        state = tree_map(lambda t, f: t.index_copy(1, ids, f), state, final)
        outputs.append(out)
    return torch.cat(outputs, 1), state

