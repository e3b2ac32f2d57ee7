"""Low-rank factorised compact multi-head attention (LAMA; Mehta, Rangwala & Ramakrishnan, 2019,
"Low Rank Factorization for Compact Multi-Head Self-Attention", arXiv 1912.00835)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..scores import as_score
from ..nn.attention import attend, check_inputs
from .base import Costs, core_flops


class LowRankAttention(Costs, nn.Module):
    """Compact multi-head attention pooling: ``heads`` attention distributions over the tokens from
    a low-rank factorisation, queried by one learned global context vector.

    Against standard multi-head attention (every token queries every token, each head with its own
    q, k, v projections) the paper's text-classification form changes three things:

    * the query is a learned global context vector ``c`` (``dim``), not the tokens;
    * head ``j``'s affinity of token ``h_t`` is the bilinear form ``c^T W_j h_t`` with ``W_j`` of rank
      ``rank``, factorised ``W_j = P_j Q_j^T`` (``P_j, Q_j``: ``dim x rank``); one matmul gives every
      head's "query" ``P_j^T c`` and "keys" ``Q_j^T h_t``, so the heads cost ``2 * dim * rank`` each
      instead of ``4 * dim^2 / heads``;
    * the values are the token states themselves (no value or output projection): head ``j`` pools
      ``m_j = sum_t a_{j,t} h_t`` with ``a_j = softmax_t(c^T W_j h_t / sqrt(rank))``.

    The ``1/sqrt(rank)`` scale is that of dot-product attention (the paper's bilinear score has none;
    it is absorbed in the learned ``P`` and ``c``). The paper runs it on bi-GRU states; here any
    ``(batch, tokens, dim)`` states. Not included: the paper's activation/normalisation details
    around the bilinear score, which we could not confirm from its text.

    **Output.** ``forward(x)`` maps ``(batch, tokens, dim)`` to ``(batch, heads, dim)``, the paper's
    structured sentence embedding (``.flatten(1)`` gives the ``(batch, heads * dim)`` vector its
    classifier reads). The context vector sits at the last position (bottom-right alignment), so a
    pattern sees one query: ``Causal()`` keeps every token, ``SlidingWindow(w)`` the last ``w + 1``.

    With ``per_token=True`` (the catalog's shape-preserving form) every position ``t`` gets its own
    copy of the context query, sees the keys its pattern allows (``Causal``: a running pooling,
    ``SlidingWindow``/``Neighborhood``: a local one), and the pooled heads are projected back:
    ``(batch, tokens, dim)`` -> ``(batch, tokens, dim)``. Under ``Full()`` every position gets the
    paper's pooled embedding.
    """

    def __init__(self, dim: int, heads: int, rank: int | None = None, *, per_token: bool = False,
                 pattern=None, score=None, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShapeError(f"{name} must be a positive integer, got {value!r}")
        rank = max(1, dim // heads) if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ShapeError(f"rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ShapeError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dim, self.heads, self.rank, self.per_token = dim, heads, rank, bool(per_token)
        self.pattern, self.dropout, self.backend = pattern, float(dropout), backend
        self.score = as_score(score)
        if self.score is not None:
            self.score.check(heads)
        self.context = nn.Parameter(torch.randn(dim) / dim ** 0.5)  # c
        self.p = nn.Linear(dim, heads * rank, bias=False)  # [P_1 ... P_heads]^T
        self.q = nn.Linear(dim, heads * rank, bias=False)  # [Q_1 ... Q_heads]^T
        self.out_proj = nn.Linear(heads * dim, dim) if per_token else None

    def affinity_factors(self) -> tuple[Tensor, Tensor]:
        """``P`` and ``Q`` as ``(heads, dim, rank)``: ``W_j = P[j] @ Q[j].T``."""
        shape = (self.heads, self.rank, self.dim)
        return self.p.weight.view(shape).transpose(1, 2), self.q.weight.view(shape).transpose(1, 2)

    def cache_refusal(self) -> str | None:
        """Why this module cannot decode with a cache (None: it can)."""
        from ..cache import refusal

        if not self.per_token:
            return "the pooling form gives one embedding of the whole sequence, not one output per token"
        return refusal(self.pattern)

    def new_cache(self, capacity: int | None = None):
        """A ``KVCache`` for the per-token form: the keys ``Q^T h_t`` and the states ``h_t`` (one
        key/value head per head; the states repeat)."""
        from ..cache import KVCache

        return KVCache.for_pattern(self.pattern, capacity=capacity)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None, need_weights: bool = False,
                cache=None):
        """``cache`` (``new_cache()``, per-token form): ``x`` holds the next tokens, whose queries
        attend over the cached keys and states under the pattern (``multihead.cache``)."""
        check_inputs(x, None, self.dim)
        batch, tokens, _ = x.shape
        queries = tokens if self.per_token else 1
        query = self.p(self.context).view(1, self.heads, 1, self.rank)
        q = query.expand(batch, -1, queries, -1)
        k = self.q(x).view(batch, tokens, self.heads, self.rank).transpose(1, 2)
        v = x.unsqueeze(1).expand(-1, self.heads, -1, -1)  # the states themselves
        if cache is not None:
            from ..cache import CacheError, cached_attention

            reason = self.cache_refusal()
            if reason is not None or need_weights:
                raise CacheError(f"LowRankAttention cannot decode with a cache: {reason or 'need_weights is not served'}")
            out = cached_attention(cache, q, k, v, pattern=self.pattern, score=self.score, backend=self.backend,
                                   dropout=self.dropout if self.training else 0.0, key_padding_mask=key_padding_mask)
            return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim))
        out, weights = attend(self, q, k, v, key_padding_mask=key_padding_mask, need_weights=need_weights)
        if self.per_token:
            out = self.out_proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim))
        else:
            out = out.squeeze(2)  # (batch, heads, dim)
        return (out, weights) if need_weights else out

    def attention_flops(self, seq_len: int) -> int:
        return core_flops(self.heads, seq_len if self.per_token else 1, seq_len, self.rank, self.dim)

    def kv_cache_elements(self) -> int:
        """Per token: the ``heads * rank`` keys (the values are the states, kept anyway)."""
        return self.heads * self.rank

    def cost_note(self, seq_len: int) -> str:
        if not self.per_token:
            return f"pooling form: one context query per head, rank {self.rank}"
        pooled = core_flops(self.heads, 1, seq_len, self.rank, self.dim)
        return (f"per-token form (catalog); the paper's pooling (one query per head, rank {self.rank}): "
                f"{pooled / 1e6:.2f} MFLOPs")

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, rank={self.rank}, per_token={self.per_token}, "
                f"pattern={self.pattern!r}, backend={self.backend!r}")
