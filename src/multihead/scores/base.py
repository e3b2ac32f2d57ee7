"""The score-modifier base: how a scaled q.k product becomes a logit.

A score is an ``nn.Module`` called like FlexAttention's ``score_mod``:
``forward(score, b, h, q_idx, kv_idx) -> score``, elementwise and broadcasting over its index
tensors, with query indices in the key frame (bottom-right alignment, as for patterns). Learnable
scores hold their parameters like any module, so they train through every backend that serves them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ShapeError


class Score(nn.Module):
    """Base class. ``additive`` scores satisfy ``forward(s) == s + forward(0)``, so a backend may
    apply them as a precomputed bias (SDPA's float mask); others (softcap) need the logits."""

    additive: bool = False
    #: Head count the score is defined for (None: any).
    num_heads: int | None = None
    #: Whether the score differs between batch elements.
    batch_dependent: bool = False
    #: Whether the score is additive and depends only on the head and ``kv_idx - q_idx`` (ALiBi,
    #: T5 buckets): the native block-sparse kernel then reads it as one vector per head.
    relative: bool = False
    #: Whether the score is additive and reads one vector per head at ``c(kv_idx) - c(q_idx)`` for
    #: some integer code ``c`` of the positions (2-D relative biases on a grid): such a score has
    #: ``native_form(kv_len) -> (codes, vector, center)`` with
    #: ``term(q, k) = vector[h, center + codes[k] - codes[q]]``, which the native kernel reads.
    coded: bool = False

    def forward(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        raise NotImplementedError

    def check(self, heads: int) -> None:
        """Raise a ``ShapeError`` if the score cannot serve ``heads`` query heads."""
        if self.num_heads is not None and self.num_heads != heads:
            raise ShapeError(
                f"{type(self).__name__} was built for {self.num_heads} heads but the queries have "
                f"{heads}; build it with heads={heads}")

    def apply_dense(self, logits: Tensor, kv_len: int) -> Tensor:
        """Apply to dense logits ``(B, H, q_len, kv_len)`` with bottom-right aligned queries."""
        batch, heads, q_len, _ = logits.shape
        device = logits.device
        b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=device).view(1, -1, 1, 1)
        q = (torch.arange(q_len, device=device) + kv_len - q_len).view(1, 1, -1, 1)
        kv = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
        return self(logits, b, h, q, kv)

    def dense_bias(self, batch: int, heads: int, q_len: int, kv_len: int, device, dtype) -> Tensor:
        """The additive term as a tensor ``(B', heads, q_len, kv_len)``, ``B'`` = 1 unless the
        score is batch dependent (additive scores only)."""
        if not self.additive:
            raise TypeError(f"{type(self).__name__} is not additive")
        batch = batch if self.batch_dependent else 1
        return self.apply_dense(torch.zeros(batch, heads, q_len, kv_len, device=device, dtype=dtype), kv_len)


class ScoreChain(Score):
    """Several score terms applied in order (e.g. a relative bias, then a softcap)."""

    def __init__(self, terms: Sequence[Score]):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.additive = all(t.additive for t in terms)
        self.batch_dependent = any(t.batch_dependent for t in terms)

    def forward(self, score, b, h, q_idx, kv_idx):
        for term in self.terms:
            score = term(score, b, h, q_idx, kv_idx)
        return score

    def check(self, heads):
        for term in self.terms:
            term.check(heads)


def as_score(score) -> Score | None:
    """Accept ``None``, a ``Score`` or a sequence of them."""
    if score is None or isinstance(score, Score):
        return score
    if isinstance(score, Sequence) and all(isinstance(s, Score) for s in score):
        return ScoreChain(list(score)) if score else None
    raise ShapeError(f"score must be a multihead Score or a list of them, got {type(score).__name__}")
