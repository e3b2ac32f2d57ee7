"""Combiner (Ren et al., 2021, "Combiner: Full Attention Transformer with Sparse Computation Cost",
arXiv 2107.05768), the fixed-partition causal form.

Against causal attention, a query reads the tokens of its own block directly and every earlier block
only through that block's abstraction: attention is a conditional expectation factorised as

    A(x_i) = sum_{j <= i, j in block(i)} p(j | i) v_j  +  sum_{r < block(i)} p(r | i) E_{j ~ q(.|r)}[v_j],

one softmax over the direct keys and one summary key per earlier region (``p``), while inside a region
a query-independent distribution ``q(j | r)`` averages the values. Here each region becomes one extra
token - key ``k_r`` (the mean of its keys) and value ``v_r = sum_j q(j|r) v_j`` with
``q(j|r) = softmax_j(w_h . k_j)`` (``w_h`` learned per head) - and one ``multihead.attention`` call runs
over ``[tokens ; region tokens]`` with each query's keys as a ``KeySelection`` (its block so far and
the earlier regions): ``N x (block + N / block)`` pairs, ``O(N sqrt N)`` for ``block ~ sqrt N``. The
summary key and ``q`` are this library's choice of the paper's "region abstractions".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..patterns import KeySelection
from .attention import MultiHeadAttention, attend, check_inputs


def combiner_selection(length: int, block: int, batch: int, heads: int, device=None) -> KeySelection:
    """Per query ``i``: keys ``[block start, i]`` of the tokens and ``length + r`` for every complete
    earlier region ``r < i // block`` (region tokens follow the ``length`` tokens)."""
    regions = length // block
    rows = torch.arange(length, device=device)
    start = rows // block * block
    local = start[:, None] + torch.arange(block, device=device)
    local_ok = local <= rows[:, None]
    region = torch.arange(regions, device=device)
    region_ok = region < (rows // block)[:, None]
    indices = torch.cat([local.clamp(max=length - 1), (length + region).expand(length, -1)], 1)
    valid = torch.cat([local_ok, region_ok], 1)
    return KeySelection(indices.expand(batch, heads, -1, -1), valid.expand(batch, heads, -1, -1), length + regions)


class CombinerAttention(MultiHeadAttention):
    """Combiner-Fixed causal self-attention (module docstring) with regions of ``block`` tokens."""

    causal = True

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, block: int, **options):
        for name in ("pattern", "score", "normalizer", "kv_dim", "context_parallel"):
            if options.get(name) is not None:
                raise ShapeError(f"CombinerAttention sets its own {name}; drop {name}=")
        super().__init__(dim, heads, kv_heads, **options)
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ShapeError(f"block must be a positive integer, got {block!r}")
        self.block = block
        self.region_query = nn.Parameter(torch.zeros(self.kv_heads, self.head_dim))  # w_h: uniform q at start

    def regions(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Region keys (mean key) and values (``q(j|r)``-weighted) ``(B, Hkv, regions, D)``."""
        batch, kv_heads, length, dim = k.shape
        regions = length // self.block
        kr = k[:, :, :regions * self.block].reshape(batch, kv_heads, regions, self.block, dim)
        vr = v[:, :, :regions * self.block].reshape(batch, kv_heads, regions, self.block, v.shape[-1])
        q_local = torch.einsum("bhrjd,hd->bhrj", kr, self.region_query.to(k.dtype)).softmax(-1)
        return kr.mean(3), torch.einsum("bhrj,bhrjd->bhrd", q_local, vr)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False):
        if context is not None or key_padding_mask is not None:
            raise ShapeError("CombinerAttention is causal self-attention: pass no context or key_padding_mask")
        check_inputs(x, None, self.dim)
        q, k, v = self.project(x, x)
        rk, rv = self.regions(k, v)
        keys, values = torch.cat([k, rk], 2), torch.cat([v, rv], 2)
        pattern = combiner_selection(x.shape[1], self.block, x.shape[0], self.heads, x.device)
        out, weights = attend(self, q, keys, values, need_weights=need_weights, pattern=pattern)
        y = self.combine(out, x)
        return (y, weights) if need_weights else y
