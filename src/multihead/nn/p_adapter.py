"""p-adapter (Wu et al., 2024, "p-Laplacian Adaptation for Generative Pre-trained Vision-Language
Models", AAAI, arXiv 2312.10613), after the authors' released code (wuhy68/p-Adapter,
``eff_blip/eff_modeling_blip.py``, ``BertSelfAttention`` and ``BertSelfOutput``, commit 27ea4b44).

Standard attention returns ``A V`` and stops. The p-adapter reads the attention map ``A`` as the
adjacency of a graph and adds, after the output projection ``h = W_o (A V)``, one step of
**p-Laplacian message passing** over that graph (an adapter: the attention's own weights stay frozen
in the paper's use, only the adapter trains). Node features are ``F = W_in(W_o(u))``, the output
projection and a down-projection (``dim / reduction`` channels, split over the heads) of node inputs
``u``. Per head, the edge weights are re-normalised by the features,

    M_ij = A_ij * || sqrt(A_ij + eps) (F_j - F_i) + eps ||^(p - 2),
    out_i = (sum_j M_ij F_j + (2 mu / p) [self] F_i) / (sum_j M_ij + 2 mu / p),

so for ``p < 2`` edges between dissimilar nodes are damped and for ``p > 2`` boosted; ``p = 2`` is the
plain ``A`` with a self-loop. The adapter's output is ``W_out(GELU(W_gate h) * out)``, added to ``h``.
``p`` is learnable (initialised at 1.25, the authors' configuration) and ``mu = mu0 (2 + tanh(m))``
with ``m`` learnable from 0 (``mu0`` = 0.1). ``eps`` (1e-8) is the authors' guard, kept as they place
it: on the diagonal of the self-attention graph ``F_i - F_i = 0``, so ``M_ii = A_ii (eps sqrt(d))^(p-2)``
(with ``d`` the features per head), which for ``p < 2`` is large and makes a node keep mostly its own
feature (at p = 1.25, 32 random tokens, 4 heads: 99.95% of the weight on the diagonal) - a property of
the released code, not a choice made here.

Two graphs, as in the code:

- ``graph="values"`` (the code's self-attention branch, also its decoder in training): the nodes are
  the tokens with ``u`` the value projections, the adjacency is ``A`` itself (under the module's
  pattern, e.g. causal) and the self-loop term ``(2 mu / p) F_i`` is kept.
- ``graph="bipartite"`` (the code's cross-attention branch; the paper's heterophilic graph): query
  nodes with ``u`` the query projections and value nodes with ``u`` the value projections,
  average-pooled over the keys to ``sample_len`` nodes (``adaptive_avg_pool``, the map ``A`` pooled the
  same way; ``None``: no pooling, the code's cached-decoder branch), adjacency ``[[0, A], [A^T, 0]]``;
  the output is read at the query nodes. The code slices the diagonal self-loop matrix to its
  off-diagonal block, so there ``2 mu / p`` enters only the denominator (a sink with a zero value);
  followed here as released (p-Laplacian message passing in the GNN literature keeps a ``beta_i F_i``
  term).

How it runs: the attention is one ``multihead.attention`` call whose values carry, beside ``V``, the
pooling matrix (the identity for ``graph="values"``), so that the same call returns ``A V`` and the
(pooled) map ``A`` on every backend. The calibrated aggregation is a second call with the logits
``log M_ij`` as a ``BlockBias`` (blocks of one key) over the node features as values (the self-loop
folded into the diagonal, or a zero-value sink key of logit ``log(2 mu / p)``): the softmax of those
logits is exactly ``M`` divided by its row sum plus ``2 mu / p``. The pairwise feature distances are
the module's own term, dense ``(B, H, Lq, nodes, d)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..scores.blocks import BlockBias
from .attention import MultiHeadAttention, check_inputs, merge_heads, split_heads

GRAPHS = ("values", "bipartite")


def adaptive_pool_matrix(length: int, size: int, *, device=None, dtype=None) -> Tensor:
    """``(length, size)``: column ``s`` averages the rows ``floor(s L / size) .. ceil((s + 1) L / size)``,
    torch's ``adaptive_avg_pool`` windows (they overlap when ``size`` does not divide ``length``)."""
    out = torch.zeros(length, size, device=device, dtype=dtype)
    for s in range(size):
        start, end = (s * length) // size, -((-(s + 1) * length) // size)
        out[start:end, s] = 1.0 / (end - start)
    return out


def p_laplacian_logits(a: Tensor, f_query: Tensor, f_node: Tensor, p: Tensor, eps: float) -> Tensor:
    """``log M_ij = log A_ij + (p - 2) log || sqrt(A_ij + eps) (F_j - F_i) + eps ||`` for adjacency
    ``a`` ``(B, H, Lq, n)``, query-node features ``(B, H, Lq, d)`` and node features ``(B, H, n, d)``.
    Entries with ``A_ij`` below the dtype's smallest normal number take its log (no gradient)."""
    diff = f_node.unsqueeze(2) - f_query.unsqueeze(3)  # (B, H, Lq, n, d): F_j - F_i
    norm = torch.linalg.vector_norm(torch.sqrt(a + eps).unsqueeze(-1) * diff + eps, dim=-1)
    return torch.log(a.clamp_min(torch.finfo(a.dtype).tiny)) + (p - 2) * torch.log(norm)


class PLaplacianAttention(MultiHeadAttention):
    """Multi-head attention followed by the p-adapter (module docstring): returns
    ``h + W_out(GELU(W_gate h) * aggregated)`` with ``h`` the attention's output projection; the block's
    residual and norm stay outside, as for any attention module.

    Args:
        dim, heads: as ``MultiHeadAttention`` (``kv_heads`` must equal ``heads``, no ``position``).
        reduction: the adapter's width is ``dim // reduction`` (8, the authors'), split over the heads.
        p: initial ``p`` (1.25); ``learnable_p``: whether it trains (True, the authors').
        mu: ``mu0`` (0.1); the self-loop weight is ``mu0 (2 + tanh(m))``, ``m`` learned from 0.
        graph: ``"values"`` or ``"bipartite"`` (module docstring); default ``"values"`` for
            self-attention and ``"bipartite"`` when a ``context`` is given.
        sample_len: value nodes of the bipartite graph after pooling the keys (16, the authors'; None:
            every key). It must not exceed the keys.
        eps: the authors' guard inside the norm and the square root (1e-8).
        other options: as ``MultiHeadAttention`` (pattern, score, backend, kv_dim, bias; no dropout).
    """

    pattern_restricts_mixing = True  # the graph is the attention map, under the same pattern

    def __init__(self, dim: int, heads: int, *, reduction: int = 8, p: float = 1.25, learnable_p: bool = True,
                 mu: float = 0.1, graph: str | None = None, sample_len: int | None = 16, eps: float = 1e-8,
                 **options):
        for name in ("position", "context_parallel"):
            if options.get(name) is not None:
                raise ShapeError(f"PLaplacianAttention does not take {name}=; the node features are the plain "
                                 f"projections")
        super().__init__(dim, heads, **options)
        if self.dropout:
            raise ShapeError("PLaplacianAttention takes no attention dropout: the graph is the map before "
                             "dropout (as the authors'), which one call cannot give beside a dropped one")
        if self.kv_heads != heads:
            raise ShapeError(f"PLaplacianAttention needs kv_heads == heads (the value nodes are per head), "
                             f"got kv_heads={self.kv_heads}")
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1 or dim % reduction:
            raise ShapeError(f"reduction must be a positive integer dividing dim ({dim}), got {reduction!r}")
        width = dim // reduction
        if width % heads:
            raise ShapeError(f"the adapter width dim // reduction = {width} must be divisible by heads ({heads}); "
                             f"choose another reduction")
        if not (isinstance(p, (int, float)) and p > 0):
            raise ShapeError(f"p must be a positive number, got {p!r}")
        if not (isinstance(mu, (int, float)) and mu > 0):
            raise ShapeError(f"mu must be a positive number, got {mu!r}")
        if graph is not None and graph not in GRAPHS:
            raise ShapeError(f"graph must be one of {GRAPHS} or None, got {graph!r}")
        if sample_len is not None and (isinstance(sample_len, bool) or not isinstance(sample_len, int)
                                       or sample_len < 1):
            raise ShapeError(f"sample_len must be a positive integer or None, got {sample_len!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ShapeError(f"eps must be a non-negative number, got {eps!r}")
        self.reduction, self.graph, self.sample_len, self.eps, self.mu0 = reduction, graph, sample_len, float(eps), float(mu)
        self.adapter_in = nn.Linear(dim, width)
        self.adapter_gate = nn.Linear(dim, width)
        self.adapter_out = nn.Linear(width, dim)
        p_init = torch.tensor([float(p)])
        if learnable_p:
            self.p = nn.Parameter(p_init)
        else:
            self.register_buffer("p", p_init)
        self.mu_logit = nn.Parameter(torch.zeros(1))

    def cache_refusal(self) -> str | None:
        return ("the adapter's graph is the whole attention map and its node features; decoding token by token "
                "would need the cached values' features (not built)")

    def mu(self) -> Tensor:
        """``mu0 (2 + tanh(m))``."""
        return self.mu0 * (2 + torch.tanh(self.mu_logit))

    def features(self, u: Tensor) -> Tensor:
        """Node features ``W_in(W_o(u))`` of node inputs ``u`` ``(B, n, heads * head_dim)``, per head."""
        return split_heads(self.adapter_in(self.out_proj(u)), self.heads)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, cu_seqlens=None, cache=None):
        if key_padding_mask is not None or need_weights or cu_seqlens is not None or cache is not None:
            raise ShapeError("PLaplacianAttention takes x and an optional context only (no key_padding_mask, "
                             "need_weights, cu_seqlens or cache)")
        graph = self.graph or ("values" if context is None else "bipartite")
        context = check_inputs(x, context, self.dim, self.kv_dim)
        if graph == "values" and context is not x:
            raise ShapeError("graph='values' is the self-attention graph; pass no context, or graph='bipartite'")
        p = self.p[0]
        if not bool(p > 0):
            raise ShapeError(f"p has left the positive numbers ({p.item():.4g}); the p-Laplacian needs p > 0")
        q_mixed, v_mixed = self.q_proj(x), self.v_proj(context)
        q, k, v = split_heads(q_mixed, self.heads), split_heads(self.k_proj(context), self.heads), \
            split_heads(v_mixed, self.heads)
        batch, _, lq, d = q.shape
        lk = k.shape[2]
        if graph == "values" or self.sample_len is None:
            pool = torch.eye(lk, dtype=v.dtype, device=v.device)
        else:
            if self.sample_len > lk:
                raise ShapeError(f"sample_len ({self.sample_len}) exceeds the {lk} keys; lower it or pass None")
            pool = adaptive_pool_matrix(lk, self.sample_len, dtype=v.dtype, device=v.device)
        nodes = pool.shape[1]
        # one call: A V and the (pooled) map A P, on any backend
        out = attention(q, k, torch.cat([v, pool.expand(batch, self.heads, lk, nodes)], -1), pattern=self.pattern,
                        score=self.score, normalizer=self.normalizer, backend=self.backend)
        h = self.out_proj(merge_heads(out[..., :d]))
        a = out[..., d:]  # (B, H, Lq, nodes)
        log_loop = torch.log(2 * self.mu() / self.p)[0].to(x.dtype)
        if graph == "values":
            f = self.features(v_mixed)
            logits = p_laplacian_logits(a, f, f, p.to(x.dtype), self.eps)
            diagonal = torch.diagonal(logits, dim1=-2, dim2=-1)
            logits = logits - torch.diag_embed(diagonal) + torch.diag_embed(torch.logaddexp(diagonal, log_loop))
            values, pattern = f, self.pattern
        else:
            f_query = self.features(q_mixed)
            f_value = self.features(pool.t() @ v_mixed)
            logits = p_laplacian_logits(a, f_query, f_value, p.to(x.dtype), self.eps)
            logits = torch.cat([logits, log_loop.expand(*logits.shape[:-1], 1)], -1)  # the self-loop: a sink
            values, pattern = torch.cat([f_value, f_value.new_zeros(batch, self.heads, 1, f_value.shape[-1])], 2), None
        kv = values.shape[2]
        zeros_q, zeros_k = x.new_zeros(batch, self.heads, lq, 1), x.new_zeros(batch, self.heads, kv, 1)
        aggregated = attention(zeros_q, zeros_k, values, pattern=pattern, score=BlockBias(logits, 1, kv - lq),
                               scale=1.0, backend=self.backend)
        gate = F.gelu(self.adapter_gate(h))
        return h + self.adapter_out(gate * merge_heads(aggregated))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", reduction={self.reduction}, graph={self.graph}, "
                f"sample_len={self.sample_len}, mu0={self.mu0}, eps={self.eps}")
