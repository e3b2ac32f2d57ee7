"""The native kernel as an autograd Function, and the scores it evaluates inside its tiles.

The kernel computes ``logit = post + cap * tanh((scale * q.k + pre) / cap)`` (without a cap:
``scale * q.k + pre + post``), where ``pre`` and ``post`` are per-head vectors over the relative
position ``kv_idx - q_idx``: the sum of the ``relative`` score terms before and after a
``Softcap``. The vectors are made from the score's own ``forward`` under autograd, so a learnable
table (T5's buckets) gets its gradient through them: the kernel returns the gradient of each
vector, and autograd carries it back to the table. A ``coded`` term (a 2-D relative bias on a grid)
is read the same way at ``codes[kv_idx] - codes[q_idx]``, with the codes it gives. A score
``Reordered`` into a permuted frame (Routing's clusters) is read at the tokens' original positions:
the kernel takes the positions (or their codes) per batch element and head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...scores.base import ScoreChain
from ...scores.reindexed import Reindexed, Reordered
from ...scores.softcap import Softcap
from . import contiguous, kernel


def _cap_of(term) -> float | None:
    while isinstance(term, Reindexed):
        term = term.inner
    return term.cap if isinstance(term, Softcap) else None


def _flat_terms(score) -> list:
    if score is None:
        return []
    if isinstance(score, ScoreChain):
        return [t for term in score.terms for t in _flat_terms(term)]
    return [score]


def split_score(score):
    """``(pre_terms, cap, post_terms)`` of a score the kernel can evaluate, or a string saying why
    it cannot (a phrase completing "the score ..."). A ``Reordered`` score's terms are its inner
    score's (``native_attention`` reads them at the original positions)."""
    if isinstance(score, Reordered):
        score = score.inner
    pre, post, cap = [], [], None
    for term in _flat_terms(score):
        c = _cap_of(term)
        if c is not None:
            if cap is not None:
                return "applies two softcaps"
            cap = c
        elif (term.relative or term.coded) and not term.batch_dependent:
            (post if cap is not None else pre).append(term)
        else:
            return (f"has a term ({type(term).__name__}) that is not a function of the head and the "
                    f"relative position alone (native: ALiBi, RelativePositionBias, 2-D relative "
                    f"biases, Softcap)")
    terms = pre + post
    if any(t.coded for t in terms) and len(terms) > 1:
        return "adds a 2-D relative bias to other terms (native: a 2-D bias alone, with a softcap or not)"
    return pre, cap, post


def relative_vector(terms: list, heads: int, q_len: int, kv_len: int, dtype, device) -> Tensor | None:
    """The sum of relative score terms as ``(heads, q_len + kv_len - 1)``: entry ``[h, j]`` is the
    term for head ``h`` at ``kv_idx - q_idx = j - (kv_len - 1)`` (inside autograd)."""
    if not terms:
        return None
    length = q_len + kv_len - 1
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    h = torch.arange(heads, device=device).view(1, heads, 1, 1)
    q = torch.full((1, 1, 1, 1), kv_len - 1, dtype=torch.long, device=device)
    kv = torch.arange(length, device=device).view(1, 1, 1, length)
    total = torch.zeros(1, heads, 1, length, dtype=dtype, device=device)
    for term in terms:
        total = term(total, b, h, q, kv)
    return total.reshape(heads, length).contiguous()


def partitions(batch: int, kv_heads: int, tiles: int) -> int:
    """How many parts the tiles of one (batch, key head) are split into in backward, each with its
    own key / value gradient accumulator: enough units to keep every thread busy."""
    threads = max(1, torch.get_num_threads())
    return max(1, min(tiles, 8, math.ceil(2 * threads / max(1, batch * kv_heads))))


def _mix32(x: Tensor) -> Tensor:
    """The kernel's 32-bit mixing function (lowbias32) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` without leaving int64 (the constant in two 16-bit halves)."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & 0xFFFFFFFF


def dropout_mask(seed: int, p: float, batch: int, heads: int, q_len: int, kv_len: int) -> Tensor:
    """The kernel's dropout keep mask ``(batch, heads, q_len, kv_len)`` for ``seed`` and ``p``: the
    same counter-based hash as ``blocksparse.cpp`` (``Dropout``), in PyTorch, for tests and for
    looking at which weights a call dropped."""
    threshold = min(int(p * 2 ** 32), 2 ** 32 - 1)
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1, 1)
    q = torch.arange(q_len).view(1, 1, -1, 1)
    k = torch.arange(kv_len).view(1, 1, 1, -1)
    head = _mix32((seed & 0xFFFFFFFF) ^ _mul32(b * heads + h, 0x9E3779B9))
    row = _mix32(head ^ _mul32(q, 0x85EBCA6B))
    return _mix32(row ^ _mul32(k, 0xC2B2AE35)) >= threshold


class NativeBlockSparse(torch.autograd.Function):
    """Forward saves q, k, v, the output and the log-sum-exp; backward recomputes each tile (and
    regenerates dropout's mask from the seed). ``sigmoid``: the bias of sigmoid weights, or None
    for softmax."""

    @staticmethod
    def forward(ctx, table, scale: float, cap: float, dropout: float, seed: int, center: int, sigmoid: float | None,
                q_codes: Tensor | None, kv_codes: Tensor | None, q: Tensor, k: Tensor, v: Tensor, pre: Tensor | None,
                post: Tensor | None):
        ext = kernel()
        out, lse = ext.forward(q, k, v, *table.arrays(), scale, pre, post, q_codes, kv_codes, cap, center, dropout,
                               seed, sigmoid)
        ctx.table, ctx.scale, ctx.cap, ctx.dropout, ctx.seed, ctx.center = table, scale, cap, dropout, seed, center
        ctx.sigmoid = sigmoid
        ctx.save_for_backward(q, k, v, out, lse, pre, post, q_codes, kv_codes)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, pre, post, q_codes, kv_codes = ctx.saved_tensors
        dout = contiguous(dout)
        parts = partitions(q.shape[0], k.shape[1], ctx.table.tile_q.numel() - 1)
        want_pre = pre is not None and ctx.needs_input_grad[12]
        want_post = post is not None and ctx.needs_input_grad[13]
        dq, dk, dv, dpre, dpost = kernel().backward(
            q, k, v, out, dout, lse, *ctx.table.arrays(), ctx.scale, pre, post, q_codes, kv_codes, ctx.cap,
            ctx.center, ctx.dropout, ctx.seed, ctx.sigmoid, parts, want_pre, want_post)
        return (None,) * 9 + (dq, dk, dv, dpre if want_pre else None, dpost if want_post else None)


def native_attention(table, q: Tensor, k: Tensor, v: Tensor, scale: float, score, dropout: float = 0.0,
                     sigmoid: float | None = None) -> Tensor:
    """Attention over the tile table: q (B, H, Lq, D), k and v (B, Hkv, Lk, D) of one dtype
    (float32, float64, bfloat16 or float16); ``score`` one that ``split_score`` accepts; ``dropout``
    of the weights with a seed drawn from torch's generator (``dropout_mask`` gives its mask);
    ``sigmoid``: weights ``sigmoid(logit + sigmoid)`` instead of the softmax."""
    pre_terms, cap, post_terms = split_score(score)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads, q_len, kv_len = q.shape[1], q.shape[2], k.shape[2]
    coded = [t for t in pre_terms + post_terms if t.coded]
    # the positions the terms read: the frame's own (None), or a permuted frame's original ones
    q_pos = kv_pos = None
    if isinstance(score, Reordered):
        q_pos, kv_pos = score.q_order + (kv_len - q_len), score.kv_order
    if coded:  # one 2-D bias: its table's columns, read at codes[k] - codes[q]
        codes, vector, center = coded[0].native_form(kv_len)
        vector = vector.to(compute).contiguous()
        pre, post = (vector, None) if pre_terms else (None, vector)
        q_codes = codes[kv_len - q_len:] if q_pos is None else codes[q_pos]
        kv_codes = codes if kv_pos is None else codes[kv_pos]
    else:
        center = kv_len - 1
        pre = relative_vector(pre_terms, heads, q_len, kv_len, compute, q.device)
        post = relative_vector(post_terms, heads, q_len, kv_len, compute, q.device)
        q_codes, kv_codes = (q_pos, kv_pos) if pre is not None or post is not None else (None, None)
    if q_codes is not None:
        q_codes, kv_codes = q_codes.to(torch.long).contiguous(), kv_codes.to(torch.long).contiguous()
    q, k, v = contiguous(q), contiguous(k), contiguous(v)
    seed = int(torch.randint(0, 2 ** 31, ()).item()) if dropout > 0 else 0
    sigmoid = None if sigmoid is None else float(sigmoid)
    return NativeBlockSparse.apply(table, float(scale), float(cap or 0.0), float(dropout), seed, center, sigmoid,
                                   q_codes, kv_codes, q, k, v, pre, post)
