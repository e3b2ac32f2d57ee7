"""Softmax attention of one query over every prefix (Aaren, "Attention as an RNN", Feng et al., 2024).

With a query that does not depend on the token (Aaren's learned query), the score of token ``j``
is a number ``s_j`` and the output at ``t`` is softmax attention over the prefix ``1..t``::

    o_t = sum_{j<=t} exp(s_j) v_j / sum_{j<=t} exp(s_j)

which an RNN computes with the state ``(m, u, w)``: the running max, ``sum exp(s_j - m)`` and
``sum exp(s_j - m) v_j``. Two states combine associatively (rescale both to the larger max and
add), so the many-to-many outputs come from a prefix scan. Here ``u`` is carried as one more
column of ``w`` (``v`` extended by ones): the state is ``PrefixState(max (sequences, heads), sums
(sequences, heads, d_v + 1))``.

``recurrent_prefix_attention`` is the RNN, token by token. ``chunked_prefix_attention`` is the
parallel form: inside chunks, a dense masked softmax against each row's running max; between
chunks, the same ``scan.chunk_states`` as linear attention (by default its parallel prefix scan).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import ShapeError
from .chunks import (ChunkLayout, fold_batch, in_slabs, normalized, sequence_bounds, slab_tokens, unfold_batch,
                     with_ones)
from .scan import chunk_states


class PrefixState(NamedTuple):
    """Aaren's state per sequence and head: running max ``(S, H)`` and sums ``(S, H, d_v + 1)``
    (``sum exp(s - max) v`` then ``sum exp(s - max)``)."""

    max: Tensor
    sums: Tensor


def _combine_softmax(earlier, later):
    """Two ``(max, sums)`` states merged: both rescaled to the larger max, then added."""
    (m1, w1), (m2, w2) = earlier, later
    m = torch.maximum(m1, m2)
    finite = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # an empty state has max -inf
    return m, w1 * (m1 - finite).exp()[..., None] + w2 * (m2 - finite).exp()[..., None]


def _prepare(scores, v, cu_seqlens, initial_state, extend=True):
    if not isinstance(scores, Tensor) or scores.dim() != 3:
        raise ShapeError("scores must be a tensor (batch, heads, tokens): the learned query's q . k_t")
    if not isinstance(v, Tensor) or v.dim() != 4 or v.shape[:3] != scores.shape:
        raise ShapeError(f"v must have shape (batch, heads, tokens, d_v) with (batch, heads, tokens) = "
                         f"{tuple(scores.shape)}, got {tuple(v.shape) if isinstance(v, Tensor) else v!r}")
    if v.dtype != scores.dtype or v.device != scores.device:
        raise ShapeError(f"scores and v must share dtype and device, got {scores.dtype} and {v.dtype}")
    batch, heads, tokens = scores.shape
    bounds = sequence_bounds(batch, tokens, cu_seqlens)
    width = v.shape[-1] + 1
    v = with_ones(v) if extend else v
    sequences = len(bounds) - 1
    if initial_state is None:
        initial = PrefixState(v.new_full((sequences, heads), float("-inf")), v.new_zeros(sequences, heads, width))
    else:
        shapes = ((sequences, heads), (sequences, heads, width))
        if not isinstance(initial_state, tuple) or len(initial_state) != 2 or \
                tuple(tuple(t.shape) for t in initial_state) != shapes:
            raise ShapeError(f"initial_state must be a PrefixState(max {shapes[0]}, sums {shapes[1]}), as "
                             "returned for the previous part of each sequence")
        initial = PrefixState(*initial_state)
    return fold_batch(scores), fold_batch(v), bounds, tuple(t.transpose(0, 1) for t in initial)


def _finish(out: Tensor, final, batch: int) -> tuple[Tensor, PrefixState]:
    return unfold_batch(out, batch), PrefixState(*(t.transpose(0, 1) for t in final))


def recurrent_prefix_attention(scores: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None,
                               initial_state: PrefixState | None = None) -> tuple[Tensor, PrefixState]:
    """Aaren's RNN, one token at a time. Returns ``(out, final_state)``.

    Args:
        scores: ``(batch, heads, tokens)``, the query's logit for each token (``q . k_t * scale``).
        v: ``(batch, heads, tokens, d_v)``.
        cu_seqlens: boundaries of packed sequences (batch must be 1); the state resets at each.
        initial_state: a ``PrefixState`` per sequence (the final state of the previous part).
    Returns ``o_t``, softmax attention over each prefix ``(batch, heads, tokens, d_v)``, and the
    final state of every sequence.
    """
    batch = scores.shape[0]
    s, v, bounds, initial = _prepare(scores, v, cu_seqlens, initial_state)
    outputs, finals = [], []
    for seq, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = (initial[0][:, seq], initial[1][:, seq])
        for t in range(start, end):
            state = _combine_softmax(state, (s[:, t], v[:, t]))
            outputs.append(state[1][:, None])
        finals.append(state)
    out = torch.cat(outputs, 1) if outputs else v[:, :0]
    return _finish(normalized(out), tuple(torch.stack(parts, 1) for parts in zip(*finals)), batch)


def chunked_prefix_attention(scores: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None,
                             initial_state: PrefixState | None = None, chunk_size: int = 64,
                             parallel_scan: bool = True, slab_size: int | None = None) -> tuple[Tensor, PrefixState]:
    """``recurrent_prefix_attention`` by chunks (same arguments and results up to rounding).

    Inside a chunk, row ``i`` weighs token ``j <= i`` by ``exp(s_j - m_i)`` with ``m_i`` the running
    max (a dense ``chunk x chunk`` masked softmax); the chunk's state from the chunks before
    (``scan.chunk_states``: a parallel prefix scan, or sequential) is merged into every row. The
    tokens run in slabs of ``slab_size`` (default: ``chunks.SLAB_ELEMENTS``), states carried
    across, so the scan's log factor stays bounded and temporaries stay in cache.
    """
    batch = scores.shape[0]
    s, v, bounds, initial = _prepare(scores, v, cu_seqlens, initial_state, extend=False)
    slab = slab_tokens(slab_size, s.shape[0], chunk_size, v.shape[-1] + 1)
    out, final = in_slabs(lambda streams, part, start: _prefix_chunks(*streams, part, start, chunk_size,
                                                                       parallel_scan),
                          (s, v), bounds, initial, slab)
    return _finish(out, final, batch)


def _prefix_chunks(s: Tensor, v: Tensor, bounds: list[int], initial: tuple, chunk_size: int,
                   parallel: bool) -> tuple[Tensor, tuple]:
    """The chunked form on packed streams ``s (heads, tokens)``, ``v (heads, tokens, d_v)``: the
    output for every prefix and the final states."""
    v = with_ones(v)
    layout = ChunkLayout(bounds, chunk_size, s.device)
    sc = layout.gather(s).masked_fill(~layout.valid, float("-inf"))            # (H, chunks, C)
    vc = layout.gather(v)                                                       # (H, chunks, C, d_v + 1)
    running_max = sc.cummax(-1).values
    future = torch.ones(layout.chunk, layout.chunk, dtype=torch.bool, device=s.device).triu(1)
    weights = (sc[..., None, :] - running_max[..., :, None]).masked_fill(future, float("-inf")).exp()
    rows = weights @ vc                                                         # every prefix in its chunk
    before, final = chunk_states((running_max[..., -1], rows[..., -1, :]), _combine_softmax, layout,
                                 initial, parallel=parallel)
    _, sums = _combine_softmax(tuple(t[:, :, None] for t in before), (running_max, rows))
    return normalized(layout.scatter(sums)), final
