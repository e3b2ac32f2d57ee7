"""Sparsifiner (Wei et al., 2023, "Sparsifiner: Learning Sparse Instance-Dependent Attention for
Efficient Vision Transformers", arXiv 2303.13755): a lightweight connectivity predictor decides, per
input, which (query, key) pairs attention computes.

Against standard attention, each query attends only to the ``top_k`` keys of a predicted
connectivity map: the predictor projects every head's queries and keys to a low rank ``rank`` with
learned per-head matrices and scores every pair, ``c_ij = (q_i P_q) . (k_j P_k) / sqrt(rank)`` (a
softmax over ``c`` is its approximate attention map, run by ``multihead.attention`` on the projected
tokens); binarising each row's ``top_k`` scores gives an unstructured, instance-dependent mask (a
``KeySelection``) for the real attention. The predictor learns by distillation: the KL divergence of
its approximate map from the full attention map of the same q and k (``connectivity_loss``); the
binarised choice carries no gradient. ``TokenConnectivityPredictor`` is the paper's form, low rank
along the tokens (its figure: keys projected to a few summary tokens, a learned up-projection basis
back to all keys); ``ConnectivityPredictor`` is low rank along the head channels and serves any
length. The loss weights and the sparsity of the up-projection basis are not built.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..patterns import Causal, KeySelection
from ..scores.blocks import BlockBias
from .attention import MultiHeadAttention, attend, check_inputs


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


class ConnectivityPredictor(nn.Module):
    """Low-rank pair scores and their approximate attention map ``(B, H, Lq, Lk)`` (module docstring)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, rank: int, causal: bool = False):
        super().__init__()
        self.heads, self.kv_heads = _positive_int("heads", heads), _positive_int("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ShapeError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
        self.head_dim, self.rank, self.causal = _positive_int("head_dim", head_dim), _positive_int("rank", rank), causal
        self.q_weight = nn.Parameter(torch.randn(heads, head_dim, rank) / math.sqrt(head_dim))
        self.k_weight = nn.Parameter(torch.randn(kv_heads, head_dim, rank) / math.sqrt(head_dim))

    def project(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if (not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.dim() != 4 or k.dim() != 4
                or q.shape[1] != self.heads or k.shape[1] != self.kv_heads or q.shape[3] != self.head_dim
                or k.shape[3] != self.head_dim or q.shape[0] != k.shape[0]):
            raise ShapeError(f"the predictor was built for q (B, {self.heads}, L, {self.head_dim}) and k "
                             f"(B, {self.kv_heads}, L, {self.head_dim}); got {getattr(q, 'shape', q)!r}, "
                             f"{getattr(k, 'shape', k)!r}")
        return (torch.einsum("bhld,hdr->bhlr", q, self.q_weight.to(q.dtype)),
                torch.einsum("bhld,hdr->bhlr", k, self.k_weight.to(k.dtype)))

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        """The approximate attention map ``softmax(c)`` (causal when ``causal``)."""
        pq, pk = self.project(q, k)
        dummy = pk.new_zeros(*pk.shape[:3], 1)
        _, weights = attention(pq, pk, dummy, pattern=Causal() if self.causal else None, backend="reference",
                               return_weights=True)
        return weights

    def select(self, q: Tensor, k: Tensor, top_k: int) -> KeySelection:
        """The binarised mask: each query row's ``top_k`` pairs by predicted score (allowed keys only)."""
        top_k = _positive_int("top_k", top_k)
        with torch.no_grad():
            scores = self(q.detach(), k.detach())
            keep = min(top_k, scores.shape[-1])
            if self.causal:  # rows that see fewer than top_k keys keep them all
                kv_len, q_len = scores.shape[-1], scores.shape[-2]
                rows = torch.arange(q_len, device=scores.device) + kv_len - q_len
                scores = scores.masked_fill(torch.arange(kv_len, device=scores.device) > rows[:, None], -1.0)
            top = scores.topk(keep, dim=-1)
            indices, order = top.indices.sort(-1)
            valid = top.values.gather(-1, order) >= 0
        return KeySelection(indices, valid, scores.shape[-1])

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, rank={self.rank}"


class TokenConnectivityPredictor(ConnectivityPredictor):
    """The predictor low-rank along the tokens, as in the paper's figure (Linformer's projection): the
    keys are projected to ``rank`` summary tokens ``E k`` (``E`` learned, ``(rank, tokens)``), every query
    scores them, ``q (E k)^T / sqrt(head_dim)``, and a learned up-projection basis ``W_up``
    ``(rank, tokens)`` maps the scores back to every key: ``c = q (E k)^T W_up / sqrt(head_dim)``. Built
    for a fixed number of ``tokens``; the approximate map is ``softmax(c)``."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, rank: int, tokens: int, causal: bool = False):
        super().__init__(heads, kv_heads, head_dim, rank, causal)
        self.tokens = _positive_int("tokens", tokens)
        del self.q_weight, self.k_weight
        self.down = nn.Parameter(torch.randn(rank, tokens) / math.sqrt(tokens))
        self.up = nn.Parameter(torch.randn(rank, tokens) / math.sqrt(rank))

    def project(self, q: Tensor, k: Tensor):
        if (not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.dim() != 4 or k.dim() != 4
                or q.shape[1] != self.heads or k.shape[1] != self.kv_heads or k.shape[2] != self.tokens
                or q.shape[2] != self.tokens):
            raise ShapeError(f"the predictor was built for {self.tokens} tokens, {self.heads} heads and {self.kv_heads} "
                             f"kv heads; got q {getattr(q, 'shape', q)!r}, k {getattr(k, 'shape', k)!r}")
        return q, torch.einsum("rn,bhnd->bhrd", self.down.to(k.dtype), k)

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        q, summary = self.project(q, k)
        group = self.heads // self.kv_heads
        summary = summary.repeat_interleave(group, 1) if group > 1 else summary
        c = torch.matmul(torch.matmul(q, summary.transpose(-2, -1)) / math.sqrt(q.shape[-1]), self.up.to(q.dtype))
        zeros = q.new_zeros(*q.shape[:3], 1)
        _, weights = attention(zeros, zeros[:, :1], zeros[:, :1], pattern=Causal() if self.causal else None,
                               score=BlockBias(c, 1), scale=1.0, backend="reference", return_weights=True)
        return weights


def connectivity_loss(approx: Tensor, q: Tensor, k: Tensor, *, causal: bool = False, scale: float | None = None) -> Tensor:
    """KL(full attention map of q, k || the predictor's approximate map), summed over keys, averaged
    over batch, heads and queries; the full map is the (detached) target."""
    with torch.no_grad():
        dummy = k.new_zeros(*k.shape[:3], 1)
        _, full = attention(q.detach(), k.detach(), dummy, pattern=Causal() if causal else None, scale=scale,
                            backend="reference", return_weights=True)
    if approx.shape != full.shape:
        raise ShapeError(f"approx {tuple(approx.shape)} must be the attention map's shape {tuple(full.shape)}")
    kept = full > 0
    terms = torch.where(kept, full * (full.clamp_min(1e-30).log() - approx.clamp_min(1e-30).log()),
                        torch.zeros_like(full))
    return terms.sum(-1).mean()


class Sparsifiner(MultiHeadAttention):
    """Attention on the ``top_k`` keys per query that a low-rank connectivity predictor picks for
    this input (module docstring); with ``tokens`` the predictor is low-rank along the tokens (the
    paper's form, ``TokenConnectivityPredictor``), otherwise along the head channels
    (``ConnectivityPredictor``). ``connectivity_loss(x)`` trains the predictor by distillation
    (the attention's projections are detached in it). ``causal`` restricts the scores and the choice
    to earlier keys (then the module is token-causal). Takes the topology options of
    ``MultiHeadAttention`` except ``pattern``, ``score`` and ``normalizer``."""

    #: The predictor makes the pattern; ``causal`` says whether it is causal.
    pattern_restricts_mixing = False

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, top_k: int = 32, rank: int = 8,
                 causal: bool = False, tokens: int | None = None, **options):
        for name in ("pattern", "score", "normalizer", "kv_dim", "context_parallel"):
            if options.get(name) is not None:
                raise ShapeError(f"Sparsifiner sets its own {name}; drop {name}=")
        super().__init__(dim, heads, kv_heads, **options)
        self.top_k, self.causal = _positive_int("top_k", top_k), bool(causal)
        self.predictor = (ConnectivityPredictor(self.heads, self.kv_heads, self.head_dim, rank, self.causal)
                          if tokens is None else
                          TokenConnectivityPredictor(self.heads, self.kv_heads, self.head_dim, rank, tokens, self.causal))

    def freeze_predictor(self) -> "Sparsifiner":
        """Stop the predictor's parameters from training (the output gives them no gradient; they
        learn from ``connectivity_loss``); returns the module."""
        for p in self.predictor.parameters():
            p.requires_grad_(False)
        return self

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False):
        if context is not None:
            raise ShapeError("Sparsifiner is self-attention: pass no context")
        check_inputs(x, None, self.dim)
        q, k, v = self.project(x, x)
        pattern = self.predictor.select(q, k, self.top_k)
        out, weights = attend(self, q, k, v, key_padding_mask=key_padding_mask, need_weights=need_weights,
                              pattern=pattern)
        y = self.combine(out, x)
        return (y, weights) if need_weights else y

    def connectivity_loss(self, x: Tensor) -> Tensor:
        """The predictor's distillation loss on input ``x``."""
        check_inputs(x, None, self.dim)
        q, k, _ = self.project(x, x)
        q, k = q.detach(), k.detach()
        return connectivity_loss(self.predictor(q, k), q, k, causal=self.causal)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", top_k={self.top_k}, causal={self.causal}"
