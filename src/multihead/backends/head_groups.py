"""Patterns that differ per head, run one group of heads at a time."""

from __future__ import annotations

import torch
from torch import Tensor

from ..normalizers import Sigmoid, Softmax
from ..scores.reindexed import Reindexed
from .base import Backend


def head_split(req) -> list[tuple[int, int, object]] | None:
    """The runs of heads ``(h0, h1, pattern)`` of ``req``'s pattern (``Pattern.head_groups``) when
    there are two or more and each holds whole groups of query heads sharing a key/value head;
    None otherwise."""
    pattern = req.pattern
    if pattern.num_heads in (None, 1) or req.q_order is not None:
        return None
    runs = pattern.head_groups()
    per_kv = req.heads // req.kv_heads
    if not runs or len(runs) < 2 or any(h0 % per_kv or h1 % per_kv for h0, h1, _ in runs):
        return None
    return runs


class HeadGroupsBackend(Backend):
    """A pattern that differs per head (``PerHead``, ``CrossShapedWindow``), one run of heads at a time.

    Instead of one request whose plan must serve every head at once (per-head block layouts make
    block-sparse gather every group, and keep grid patterns from its tiled plan), each run of heads
    ``[h0, h1)`` that shares a head-independent pattern becomes a request of its own: its heads of
    q, k and v, that pattern, the score seen at its heads (``Reindexed``), run by the backend
    ``auto`` picks for it. CSWin's horizontal stripes are then contiguous blocks of tokens and its
    vertical ones a grid pattern that block-sparse visits tile by tile.
    """

    name = "heads"

    def limits(self, req):
        if req.return_weights:
            return "does not return attention weights (use backend='reference')"
        if not isinstance(req.normalizer, (Softmax, Sigmoid)):
            return (f"splits the heads, which {type(req.normalizer).__name__} (built for all of them) "
                    f"does not follow; serves softmax and sigmoid")
        if head_split(req) is None:
            return ("serves patterns that differ per head in runs of heads (PerHead, "
                    "CrossShapedWindow), each run holding whole groups of query heads that share a "
                    "key/value head")
        return None

    def forward(self, req):
        from ..functional import attention

        runs = head_split(req)
        per_kv = req.heads // req.kv_heads
        sizes = [h1 - h0 for h0, h1, _ in runs]
        # one split per tensor: its backward assembles each gradient once, not once per run
        qs = _SplitHeads.apply(req.q, sizes)
        ks, vs = (_SplitHeads.apply(t, [n // per_kv for n in sizes]) for t in (req.k, req.v))
        outputs = []
        for (h0, _, pattern), q, k, v in zip(runs, qs, ks, vs):
            score = None if req.score is None else Reindexed(req.score, heads=h0)
            outputs.append(attention(q, k, v, pattern=pattern, score=score, scale=req.scale,
                                     dropout=req.dropout, normalizer=req.normalizer))
        return _JoinHeads.apply(*outputs), None


def _join(parts) -> Tensor:
    """``torch.cat(parts, 1)`` into a kept buffer of the native kernel where it has one: a fresh
    32 MiB tensor (16k tokens, 8 heads of 64) faults its pages in, 8 ms a join on this machine,
    where a kept one is written in 1 ms. Under autograd (a double backward) the plain ``cat``."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
        return torch.cat(parts, 1)
    from .native import empty

    shape = list(parts[0].shape)
    shape[1] = sum(p.shape[1] for p in parts)
    return torch.cat(parts, 1, out=empty(shape, parts[0].dtype, parts[0].device))


class _SplitHeads(torch.autograd.Function):
    """``x.split(sizes, 1)``, whose gradients are joined into a kept buffer (``_join``)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]):
        return x.split(sizes, 1)

    @staticmethod
    def backward(ctx, *grads):
        return _join(grads), None


class _JoinHeads(torch.autograd.Function):
    """The runs' outputs joined along the heads into a kept buffer (``_join``)."""

    @staticmethod
    def forward(ctx, *parts: Tensor) -> Tensor:
        ctx.sizes = [p.shape[1] for p in parts]
        return _join(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad.split(ctx.sizes, 1)
