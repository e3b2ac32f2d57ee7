"""Linear attention with decay: the recurrent definition and the chunked parallel form.

Both compute, for each packed sequence, with a state ``S`` of shape ``(d_k, d_v)`` per head::

    S_t = exp(g_t) * S_{t-1} + k_t^T v_t        o_t = q_t S_t

(causal; ``g_t <= 0`` is the log-decay, 0 = no decay), starting from ``initial_state`` (zeros by
default) and resetting at every sequence boundary. Against softmax attention the weight of key
``j`` for query ``i`` is the plain product ``q_i . k_j`` times ``exp(g_{j+1} + ... + g_i)``, with
no softmax; feature maps (elu+1, ReLU, ...) are applied to q and k (``feature_map``). Non-causal:
``o_t = q_t S_end`` with ``S_end`` the state after the whole sequence (no decay). ``normalize``
divides by ``q_t . z_t`` with ``z_t`` the same recurrence on ``k_t`` alone (Katharopoulos et al.,
2020), carried as one more column of the state (``v`` extended by a column of ones), so the state
is ``(d_k, d_v + 1)`` then.

``recurrent_linear_attention`` is the definition, token by token. ``chunked_linear_attention`` is
the fast form (lightning attention's split, TransNormerLLM): dense inside chunks of ``chunk_size``
tokens, a recurrence over chunk states between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ShapeError
from .chunks import (ChunkLayout, fold_batch, in_slabs, normalized, sequence_bounds, slab_tokens, unfold_batch,
                     with_ones)


def _check(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ShapeError(f"{name} must be a tensor (batch, heads, tokens, head_dim)")
        if t.dtype != q.dtype or t.device != q.device:
            raise ShapeError(f"q, k and v must share dtype and device; {name} is {t.dtype} on {t.device}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ShapeError(f"q and k must have one shape and v the same (batch, heads, tokens); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if log_decay is not None:
        batch, heads, tokens = q.shape[:3]
        if log_decay.shape not in ((heads,), (batch, heads, tokens)):
            raise ShapeError(f"log_decay must have shape (heads,) = ({heads},) or (batch, heads, tokens) = "
                             f"{(batch, heads, tokens)}, got {tuple(log_decay.shape)}")
        if not causal:
            raise ShapeError("log_decay needs causal=True: a decay orders the tokens")
        if bool((log_decay > 0).any()):
            raise ShapeError("log_decay must be <= 0 (a decay in (0, 1]; 0 means none): the state would grow")


def _prepare(q, k, v, log_decay, causal, normalize, cu_seqlens, initial_state, extend=True):
    """Validate; fold the batch into packed ``(heads, total, d)`` streams; extend v for the
    normaliser (unless ``extend`` is False: the caller does it piece by piece); the initial state
    as ``(heads, sequences, d_k, d_v')``."""
    _check(q, k, v, log_decay, causal)
    batch, heads, tokens, d_k = q.shape
    bounds = sequence_bounds(batch, tokens, cu_seqlens)
    d_v = v.shape[-1] + normalize
    if normalize and extend:
        v = with_ones(v)
    g = None
    if log_decay is not None:
        g = log_decay.to(q.dtype)
        g = g[None, :, None].expand(batch, heads, tokens) if g.dim() == 1 else g
        g = fold_batch(g)
    sequences = len(bounds) - 1
    shape = (sequences, heads, d_k, d_v)
    if initial_state is None:
        initial = q.new_zeros(shape)
    elif not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != shape:
        got = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else type(initial_state).__name__
        raise ShapeError(f"initial_state must have shape (sequences, heads, d_k, d_v{' + 1' if normalize else ''})"
                         f" = {shape}, got {got}")
    else:
        initial = initial_state.to(q.dtype)
    return fold_batch(q), fold_batch(k), fold_batch(v), g, bounds, initial.transpose(0, 1)


def _finish(out: Tensor, final: Tensor, batch: int, normalize: bool, eps: float) -> tuple[Tensor, Tensor]:
    out = unfold_batch(out, batch)
    return (normalized(out, eps) if normalize else out), final.transpose(0, 1)


def recurrent_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, log_decay: Tensor | None = None,
                               causal: bool = True, normalize: bool = False, cu_seqlens: Tensor | None = None,
                               initial_state: Tensor | None = None, feature_map: Callable | None = None,
                               scale: float = 1.0, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The definition, one token at a time. Returns ``(out, final_state)``.

    Args:
        q, k: ``(batch, heads, tokens, d_k)``; v: ``(..., d_v)``.
        feature_map: applied to q and k token by token first (e.g. ``F.silu``; None: none).
        scale: multiplies every ``q . k`` (applied to q).
        log_decay: ``(heads,)`` or ``(batch, heads, tokens)``, values <= 0 (causal only).
        causal: each token reads the state after itself; else every token reads the final state.
        normalize: divide by ``q . z`` (+ ``eps``), ``z`` the decayed sum of keys.
        cu_seqlens: boundaries of packed sequences (batch must be 1); states reset at each one.
        initial_state: ``(sequences, heads, d_k, d_v [+ 1 if normalize])``.
    Returns the output ``(batch, heads, tokens, d_v)`` and the final state of every sequence.
    """
    batch = q.shape[0]
    q, k, v, g, bounds, initial = _prepare(q, k, v, log_decay, causal, normalize, cu_seqlens, initial_state)
    if feature_map is not None:
        q, k = feature_map(q), feature_map(k)
    q = q * scale
    outputs, finals = [], []
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = initial[:, s]
        for t in range(start, end):
            if g is not None:
                state = state * g[:, t].exp()[:, None, None]
            state = state + k[:, t, :, None] * v[:, t, None, :]
            if causal:
                outputs.append((q[:, t, None, :] @ state).squeeze(1)[:, None])
        if not causal and end > start:
            outputs.append(q[:, start:end] @ state)
        finals.append(state)
    out = torch.cat(outputs, 1) if outputs else v.new_zeros(v.shape[0], 0, v.shape[-1])
    return _finish(out, torch.stack(finals, 1), batch, normalize, eps)


def _block_size(chunks: int) -> int:
    """The power of two at or above ``sqrt(chunks)`` (no padding when ``chunks`` is a power of two)."""
    return 1 << math.ceil(math.log2(chunks) / 2) if chunks > 1 else 1


def _read_states(reads: Tensor, summaries: Tensor, chunk_decay: Tensor, layout: ChunkLayout,
                 initial: Tensor) -> tuple[Tensor, Tensor]:
    """The inter-chunk recurrence of lightning attention, blocked: ``reads @ S_before`` for every
    chunk ``(H, chunks, C, d_v)`` and the final state of every sequence ``(H, sequences, d_k, d_v)``.

    ``S_before[c]`` is the initial state at a sequence start, else ``decay[c-1] S_before[c-1] +
    summaries[c-1]``. The chunks are cut into ``G`` groups of ``B ~ sqrt(chunks)``: one pass over the
    ``B`` positions (all groups at once) gives each group's effect, a pass over the ``G`` groups
    their starting states, a second pass over positions the states, read at once and never stored
    together: about ``3 sqrt(chunks)`` steps on ``1/B`` of the states each.
    """
    heads, chunks = chunk_decay.shape
    if chunks == 0:
        return reads.new_zeros(*reads.shape[:-1], summaries.shape[-1]), initial
    block = _block_size(chunks)
    groups = -(-chunks // block)
    extra = groups * block - chunks  # trailing identity chunks: decay 1, nothing added, nothing read
    pad = lambda t, value: torch.cat([t, t.new_full((heads, extra, *t.shape[2:]), value)], 1) if extra else t  # noqa: E731
    decay = pad(chunk_decay, 1.0).view(heads, groups, block)
    summaries = pad(summaries, 0.0).view(heads, groups, block, *summaries.shape[2:])
    reads = pad(reads, 0.0).view(heads, groups, block, *reads.shape[2:])
    device = summaries.device
    starts = torch.cat([layout.starts, torch.zeros(extra, dtype=torch.bool)]).view(groups, block).to(device)
    sequence = torch.cat([layout.sequence, layout.sequence.new_zeros(extra)]).view(groups, block)
    zero = summaries.new_zeros(heads, groups, *summaries.shape[3:])

    def positions(group_start: Tensor | None):
        """Per position ``j``: the states before chunk ``j`` of every group, as ``mult * start + own``
        (``own`` excludes the group's starting state); then the states after it."""
        own, mult = zero, decay.new_ones(heads, groups)
        for j in range(block):
            opens = starts[:, j]
            if bool(opens.any()):
                own = torch.where(opens[:, None, None], initial[:, sequence[:, j]], own)
                mult = mult.masked_fill(opens, 0.0)
            before = own if group_start is None else torch.addcmul(own, mult[..., None, None], group_start)
            yield j, before
            own = torch.addcmul(summaries[:, :, j], decay[:, :, j, None, None], own)
            mult = decay[:, :, j] * mult

    *_, (_, last_before) = positions(None)
    group_own = decay[:, :, -1, None, None] * last_before + summaries[:, :, -1]
    group_mult = decay.prod(-1) * ~starts.any(1)
    group_starts, current = [], zero[:, 0]
    for g in range(groups):
        group_starts.append(current)
        current = group_mult[:, g, None, None] * current + group_own[:, g]
    group_start = torch.stack(group_starts, 1)

    last = torch.tensor(layout.last, dtype=torch.long)
    outputs, finals = [], {}
    for j, before in positions(group_start):
        outputs.append(reads[:, :, j] @ before)
        ends = ((last >= 0) & (last % block == j)).nonzero().squeeze(1)
        if ends.numel():
            after = decay[:, :, j, None, None] * before + summaries[:, :, j]
            finals.update(zip(ends.tolist(), after.index_select(1, (last[ends] // block).to(device)).unbind(1)))
    out = torch.stack(outputs, 2).flatten(1, 2)[:, :chunks]
    ordered = [finals[s] if s in finals else initial[:, s] for s in range(len(layout.last))]  # empty: initial
    return out, torch.stack(ordered, 1)


def chunked_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, log_decay: Tensor | None = None,
                             causal: bool = True, normalize: bool = False, cu_seqlens: Tensor | None = None,
                             initial_state: Tensor | None = None, feature_map: Callable | None = None,
                             scale: float = 1.0, chunk_size: int = 64, slab_size: int | None = None,
                             eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``recurrent_linear_attention`` computed by chunks of ``chunk_size`` tokens (same arguments,
    same results up to rounding).

    Inside a chunk the output is dense, ``((q k^T) * decay mask) v``, plus the state before the
    chunk read by each query (``q_i exp(b_i) S``, ``b`` the cumulative log-decay inside the chunk);
    between chunks only ``(d_k, d_v)`` states move (``_read_states``: the recurrence over chunks,
    blocked). Causal inputs run in slabs of ``slab_size`` packed tokens (default: a size that keeps
    a slab's temporaries in cache, ``chunks.SLAB_ELEMENTS``), states carried from slab to slab;
    ``feature_map`` and ``scale`` are applied there too, so no temporary spans the sequence.
    Time and memory are linear in the tokens.
    """
    batch = q.shape[0]
    q, k, v, g, bounds, initial = _prepare(q, k, v, log_decay, causal, normalize, cu_seqlens, initial_state,
                                           extend=False)
    phi = feature_map or (lambda x: x)
    values = with_ones if normalize else (lambda x: x)
    slab = slab_tokens(slab_size, q.shape[0], chunk_size, max(q.shape[-1], v.shape[-1] + normalize))

    def output(out):
        return normalized(out, eps) if normalize else out

    if causal:
        def run(streams, part, start):  # one slab
            q, k, v, g = streams
            out, final = _causal_chunks(phi(q) * scale, phi(k), values(v), g, part, start, chunk_size)
            return output(out), final

        out, final = in_slabs(run, (q, k, v, g), bounds, initial, slab)
        return _finish(out, final, batch, False, eps)

    # Not causal: every query reads its sequence's end state. One pass over the slabs sums the
    # states, a second reads them.
    def accumulate(streams, part, start):
        k, v = streams
        layout = ChunkLayout(part, chunk_size, k.device)
        summaries = layout.gather(phi(k)).transpose(-1, -2) @ layout.gather(values(v))  # (H, chunks, d_k, d_v)
        return k[:, :0], start.index_add(1, layout.sequence, summaries)

    def read(streams, part, state):
        layout = ChunkLayout(part, chunk_size, state.device)
        q = layout.gather(phi(streams[0]) * scale)
        return output(layout.scatter(q @ state.index_select(1, layout.sequence))), state

    _, final = in_slabs(accumulate, (k, v), bounds, initial, slab)
    out, _ = in_slabs(read, (q,), bounds, final, slab)
    return _finish(out, final, batch, False, eps)


def _causal_chunks(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, bounds: list[int], initial: Tensor,
                   chunk_size: int) -> tuple[Tensor, Tensor]:
    """The causal chunked form on packed ``(heads, tokens, d)`` streams: outputs and final states."""
    layout = ChunkLayout(bounds, chunk_size, q.device)
    qc, kc, vc = layout.gather(q), layout.gather(k), layout.gather(v)          # (H, chunks, C, d)
    heads = q.shape[0]
    if g is None:
        chunk_decay = q.new_ones(heads, layout.chunks)
        keys_to_end = kc
    else:
        b = layout.gather(g).cumsum(-1)                                         # (H, chunks, C)
        chunk_decay = b[..., -1].exp()
        keys_to_end = kc * (b[..., -1:] - b).exp()[..., None]
    summaries = keys_to_end.transpose(-1, -2) @ vc                              # (H, chunks, d_k, d_v)
    future = torch.ones(layout.chunk, layout.chunk, dtype=torch.bool, device=q.device).triu(1)
    scores = qc @ kc.transpose(-1, -2)                                          # (H, chunks, C, C)
    if g is None:
        scores = scores.masked_fill(future, 0.0)
        reads = qc
    else:
        scores = scores * (b[..., :, None] - b[..., None, :]).masked_fill(future, float("-inf")).exp()
        reads = qc * b.exp()[..., None]
    inter, final = _read_states(reads, summaries, chunk_decay, layout, initial)
    return layout.scatter(scores @ vc + inter), final
