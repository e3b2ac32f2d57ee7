"""TransNeXt's aggregated attention (Shi, 2023, "TransNeXt: Robust Foveal Visual Perception for Vision
Transformers", arXiv 2311.17132), after the authors' ``AggregatedAttention`` (attention_native.py).

Against standard attention, every position of the map attends, under **one** softmax, to two key
sets: its ``window x window`` sliding neighborhood (zero-padded at the map's edges, so edge positions
see fewer keys: the ``Halo(1, window // 2)`` pattern) and every position of a pooled copy of the map
(``1x1 conv, GELU, adaptive average pool`` to ``(H // pool, W // pool)``, LayerNorm; the same key and
value projections). Logits are cosine similarities scaled per head and per query:
``s = (normalize(q) + e_h) * softplus(t_h) * log(n_i + P) . normalize(k) + bias`` with a learned
query embedding ``e_h``, temperature ``t_h``, ``n_i`` the neighborhood keys query ``i`` sees and
``P`` the pooled keys; ``bias`` is a learned per-head table over the window offsets for the
neighborhood and, for the pooled keys, an MLP of the log-spaced offset between the query and the
pooled position (the continuous position bias). Finally the **learnable tokens** ``T_h``
(``head_dim x window^2``) and bias ``b_h`` add weights that are not a softmax over the neighborhood's
values: ``out_i = sum_j A_ij v_j + sum_o (normalize(q_i) . T_h[:, o] + b_h[o]) v_{i + o}`` (a
neighbor outside the map contributes 0).

Here the first term is one ``multihead.attention`` call (keys ``[pooled; map]``, pattern
``Sinks(Halo(1, window // 2, grid), P)``, the two biases as one score, ``scale=1``), served by every
backend; the second is a dynamic depthwise filter over the unfolded values (no softmax, no attention
math). The Convolutional GLU channel mixer of the paper is not part of the attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..nn.attention import split_heads
from ..patterns import Halo, Sinks
from ..patterns.base import check_int
from ..scores import RelativePositionBias2d, Score
from .base import GridAttention, check_feature_map


def pooled_grid(grid: tuple[int, int], pool: int) -> tuple[int, int]:
    """The pooled map's size: ``H // pool`` by ``W // pool`` (at least 1)."""
    return tuple(max(1, n // pool) for n in grid)


def pooled_offsets(grid: tuple[int, int], pooled: tuple[int, int]) -> Tensor:
    """TransNeXt's log-spaced offsets ``(H * W, P, 2)`` from each position to each pooled position
    (the pooled position is the mean of the coordinates it averages): per axis ``r = 8 (y_q - y_k) /
    (n - 1)``, then ``sign(r) log2(|r| + 1) / 3``."""
    axes = []
    for n, p in zip(grid, pooled):
        q = torch.arange(n, dtype=torch.float32)
        k = F.adaptive_avg_pool1d(q[None], p)[0]
        axes.append((q, k))
    (qy, ky), (qx, kx) = axes
    qy, qx = (a.flatten() for a in torch.meshgrid(qy, qx, indexing="ij"))
    ky, kx = (a.flatten() for a in torch.meshgrid(ky, kx, indexing="ij"))
    rel = torch.stack([(qy[:, None] - ky[None]) / max(grid[0] - 1, 1),
                       (qx[:, None] - kx[None]) / max(grid[1] - 1, 1)], dim=-1) * 8
    return rel.sign() * torch.log2(rel.abs() + 1) / 3


class PooledAndLocalBias(Score):
    """The position bias of a call whose first ``P`` keys are pooled positions and the rest the map:
    ``pooled[h, i, j]`` for a pooled key ``j``, the window table ``local`` (a ``RelativeBias2d`` bound
    to the grid) for a map key. Queries are the map positions, in the key frame ``P + i``."""

    additive = True

    def __init__(self, pooled: Tensor, local: Score, count: int):
        super().__init__()
        self.pooled, self.local, self.count = pooled, local, count
        self.num_heads = pooled.shape[0]

    def forward(self, score, b, h, q_idx, kv_idx):
        position = q_idx - self.count
        is_pooled = kv_idx < self.count
        far = self.pooled[h, position, kv_idx.clamp(max=self.count - 1)].to(score.dtype)
        near = self.local(torch.zeros_like(score), b, h, position, (kv_idx - self.count).clamp(min=0))
        return score + torch.where(is_pooled, far, near)

    def parameters(self, recurse: bool = True):
        """The tensors the bias trains (the pooled table, the MLP's output; the window table)."""
        yield self.pooled
        yield from self.local.parameters()


class AggregatedAttention(GridAttention):
    """TransNeXt's aggregated attention on a ``(batch, H, W, dim)`` map (module docstring): a sliding
    ``window x window`` neighborhood (odd) and the map pooled by ``pool`` under one softmax, cosine
    logits with a query embedding and a length-scaled temperature, learned position biases, and the
    learnable tokens on the neighborhood's values. ``cpb_hidden``: width of the position-bias MLP
    (512 in the paper). Keyword arguments go to ``MultiHeadAttention`` (``bias``, ``backend``, ...)."""

    def __init__(self, dim: int, heads: int, window: int = 3, pool: int = 4, cpb_hidden: int = 512, **options):
        super().__init__(dim, heads, **options)
        check_int("AggregatedAttention.window", window, minimum=1)
        check_int("AggregatedAttention.pool", pool, minimum=1)
        check_int("AggregatedAttention.cpb_hidden", cpb_hidden, minimum=1)
        if window % 2 == 0:
            raise ShapeError(f"AggregatedAttention.window must be odd (a window centred on its query), got {window}")
        if self.kv_heads != heads:
            raise ShapeError(f"AggregatedAttention needs kv_heads == heads, got kv_heads={self.kv_heads}")
        self.refuse("pattern", "score", "position")
        self.window, self.pool = window, pool
        d = self.head_dim
        self.temperature = nn.Parameter(torch.full((heads,), math.log(math.expm1(1 / 0.24))))
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, 1, d), std=0.02))
        self.reduce = nn.Conv2d(dim, dim, 1)
        self.pool_norm = nn.LayerNorm(dim)
        self.cpb = nn.Sequential(nn.Linear(2, cpb_hidden), nn.ReLU(), nn.Linear(cpb_hidden, heads))
        self.local_bias = RelativePositionBias2d(heads, window // 2 + 1)
        nn.init.trunc_normal_(self.local_bias.bias_table, std=0.0004)
        self.learnable_tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, d, window * window), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(heads, 1, window * window))

    def pattern_for(self, grid):
        return Halo(1, self.window // 2, grid)

    def pooled_features(self, x: Tensor) -> Tensor:
        """``(batch, P, dim)``: the map through the 1x1 conv, GELU, adaptive average pool, LayerNorm."""
        pooled = pooled_grid(x.shape[1:3], self.pool)
        maps = F.adaptive_avg_pool2d(F.gelu(self.reduce(x.permute(0, 3, 1, 2))), pooled)
        return self.pool_norm(maps.flatten(2).transpose(1, 2))

    def neighbor_counts(self, grid: tuple[int, int], device) -> Tensor:
        """``(H * W,)``: how many neighborhood keys each position sees (fewer at the edges)."""
        r = self.window // 2

        def along(n: int) -> Tensor:  # last minus first neighbour, clipped to the axis, plus one
            x = torch.arange(n, device=device)
            return (x + r).clamp(max=n - 1) - (x - r).clamp(min=0) + 1

        rows, cols = (along(n) for n in grid)
        return (rows[:, None] * cols[None]).flatten()

    def token_term(self, q_norm: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor:
        """``sum_o (q_norm . T[:, o] + b[o]) v_{i + o}`` over the window offsets ``o`` (zero padding)."""
        batch, heads, tokens, d = v.shape
        k2 = self.window * self.window
        weights = q_norm @ self.learnable_tokens + self.learnable_bias  # (B, heads, N, k2)
        maps = v.transpose(2, 3).reshape(batch, heads * d, *grid)
        neighbors = F.unfold(maps, self.window, padding=self.window // 2).view(batch, heads, d, k2, tokens)
        return torch.einsum("bhno,bhdon->bhnd", weights, neighbors)

    def forward(self, x: Tensor, *, need_weights: bool = False):
        """``x`` ``(batch, H, W, dim)`` -> the same shape."""
        if need_weights:
            raise ShapeError("AggregatedAttention does not return weights: its learnable-token term is no softmax")
        grid = check_feature_map(x, self.dim, type(self).__name__)
        tokens = x.flatten(1, 2)
        q, k, v = self.project(tokens, tokens)
        pooled = self.pooled_features(x)
        k_pool, v_pool = split_heads(self.k_proj(pooled), self.heads), split_heads(self.v_proj(pooled), self.heads)
        count = k_pool.shape[2]
        q_norm = F.normalize(q, dim=-1)
        length_scale = torch.log((self.neighbor_counts(grid, x.device) + count).to(q.dtype)).view(1, 1, -1, 1)
        q_scaled = (q_norm + self.query_embedding) * F.softplus(self.temperature).view(1, -1, 1, 1) * length_scale
        keys = F.normalize(torch.cat([k_pool, k], dim=2), dim=-1)
        offsets = pooled_offsets(grid, pooled_grid(grid, self.pool)).to(x.device, x.dtype)
        pooled_bias = self.cpb(offsets).permute(2, 0, 1)  # (heads, N, P)
        score = PooledAndLocalBias(pooled_bias, self.local_bias.on(grid), count)
        out = attention(q_scaled, keys, torch.cat([v_pool, v], dim=2), pattern=Sinks(self.pattern_for(grid), count),
                        score=score, scale=1.0, dropout=self.dropout if self.training else 0.0,
                        backend=self.backend)
        out = out + self.token_term(q_norm, v, grid)
        return self.combine(out, tokens).view(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}, pool={self.pool}"
