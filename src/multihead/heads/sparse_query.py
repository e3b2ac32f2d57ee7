"""Sparse Query Attention (SQA; Filipek, 2025, arXiv 2510.01817)."""

from __future__ import annotations

from ..errors import ShapeError
from .base import Topology


class SparseQueryAttention(Topology):
    """Sparse Query Attention: fewer *query* heads than the model's head count.

    Against standard multi-head attention (``heads`` heads of width ``dim // heads``) it keeps the
    head width but computes only ``query_heads < heads`` query heads, with ``kv_heads <=
    query_heads`` key/value heads shared in groups as in GQA. The attention FLOPs (``q . k`` and
    ``weights . v``) fall by ``heads / query_heads``; the output projection adapts and maps
    ``query_heads * head_dim`` (not ``dim``) back to ``dim``, so it shrinks too. The paper's
    variants: symmetric sSQA (``query_heads = kv_heads = heads // 2``), extreme xSQA
    (``query_heads <= heads // 4``); ``query_heads = kv_heads = heads`` is multi-head attention.

    Args: ``dim``, ``heads`` (the model's head count, which fixes ``head_dim = dim // heads``),
    ``query_heads`` (default ``heads // 2``), ``kv_heads`` (default ``query_heads // 2``, at least 1;
    must divide ``query_heads``); the rest as ``MultiHeadAttention``. A ``score`` with per-head
    parameters is built for ``query_heads`` heads.
    """

    def __init__(self, dim: int, heads: int, query_heads: int | None = None, kv_heads: int | None = None,
                 head_dim: int | None = None, **options):
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ShapeError(f"heads must be a positive integer, got {heads!r}")
        query_heads = max(1, heads // 2) if query_heads is None else query_heads
        if isinstance(query_heads, bool) or not isinstance(query_heads, int) or not 1 <= query_heads <= heads:
            raise ShapeError(f"query_heads must be an integer in [1, heads={heads}], got {query_heads!r}")
        kv_heads = max(1, query_heads // 2) if kv_heads is None else kv_heads
        if isinstance(kv_heads, int) and kv_heads > query_heads:
            raise ShapeError(f"SQA needs kv_heads <= query_heads, got kv_heads={kv_heads} > "
                             f"query_heads={query_heads}")
        if head_dim is None:
            if dim % heads:
                raise ShapeError(f"dim ({dim}) is not divisible by heads ({heads}); pass head_dim explicitly")
            head_dim = dim // heads
        super().__init__(dim, query_heads, kv_heads, head_dim=head_dim, **options)
        self.model_heads = heads

    @property
    def query_heads(self) -> int:
        return self.heads

    def cost_note(self, seq_len: int) -> str:
        return (f"{self.heads} of {self.model_heads} query heads, {self.kv_heads} key/value heads; "
                f"FLOPs x {self.heads}/{self.model_heads}")

    def extra_repr(self) -> str:
        return f"model_heads={self.model_heads}, query_heads={self.heads}, " + super().extra_repr()
