"""Aaren (Feng et al., 2024, "Attention as an RNN", arXiv 2405.13956)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.attention import split_heads
from .base import RecurrentAttention
from .prefix import chunked_prefix_attention, recurrent_prefix_attention


class Aaren(RecurrentAttention):
    """Attention as a many-to-many RNN: the query is a learned vector per head, not a projection of
    the token, and output ``t`` is softmax attention of that query over tokens ``1..t``.

    Against standard causal attention, every position shares one query, so the logits are one
    number per token and the outputs of all prefixes come from a prefix scan of (max, sum of
    exp, sum of exp * v) instead of an N x N matrix: linear time, constant memory per new token.
    Keys and values are projections as usual (``kv_heads`` allowed); the scale is
    ``head_dim ** -0.5``. The chunked form runs the parallel prefix scan between chunks; the
    recurrent form is the RNN.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None, *,
                 bias: bool = True, form: str = "chunked", chunk_size: int = 64, parallel_scan: bool = True):
        super().__init__(dim, heads, kv_heads, head_dim, bias=bias, form=form, chunk_size=chunk_size)
        self.q_proj = None  # the query is a parameter, not a projection of the tokens
        self.query = nn.Parameter(torch.randn(heads, self.head_dim) * self.head_dim ** -0.5)
        self.parallel_scan = bool(parallel_scan)

    def project(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k = split_heads(self.k_proj(context), self.kv_heads)
        v = split_heads(self.v_proj(context), self.kv_heads)
        return self.query[None, :, None, :], k, v

    def mix(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens, initial_state):
        scores = (k @ q.transpose(-1, -2)).squeeze(-1) * self.head_dim ** -0.5  # no (tokens, d) temporary
        options = {"parallel_scan": self.parallel_scan} if self.form == "chunked" else {}
        return self.run_form(chunked_prefix_attention, recurrent_prefix_attention, scores, v,
                             cu_seqlens=cu_seqlens, initial_state=initial_state, **options)
