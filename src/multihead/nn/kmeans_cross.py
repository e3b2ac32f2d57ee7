"""k-means cross-attention (kMaX-DeepLab: Yu et al., 2022, "k-means Mask Transformer", arXiv 2207.04044).

Against the cross-attention of object queries (cluster centres) to pixels, which normalises each
query's weights over the pixels with a softmax, kMaX normalises over the *clusters*, with a hard
argmax - the assignment step of k-means: every pixel goes to its best-matching centre, and each centre
is updated with the values of the pixels assigned to it,

    C <- C + argmax_over_clusters(Q_c K_p^T) V_p.

``ClusterArgmax`` is that normaliser (one-hot over the query axis of the logits) for
``multihead.attention``, which the reference backend serves; ``KMeansCrossAttention`` is the module,
with ``assignment_logits`` exposing ``Q_c K_p^T`` for the mask prediction / deep supervision the paper
trains through (the argmax itself passes no gradient to the logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError
from ..functional import attention
from ..normalizers import Normalizer
from .attention import MultiHeadAttention, check_inputs, split_heads


class ClusterArgmax(Normalizer):
    """Weights one-hot over the queries: key (pixel) ``j`` gives weight 1 to the query (cluster) whose
    logit is highest for it, 0 to the others (ties: the first). No gradient to the logits."""

    name = "cluster_argmax"

    def weights(self, logits: Tensor, kv_len: int) -> Tensor:
        index = logits.detach().argmax(dim=-2)  # (..., keys): the winning query of every key
        return F.one_hot(index, logits.shape[-2]).transpose(-1, -2).to(logits.dtype)

    def weights_(self, logits: Tensor, kv_len: int) -> Tensor:
        return logits.copy_(self.weights(logits, kv_len))


class KMeansCrossAttention(MultiHeadAttention):
    """kMaX's k-means cross-attention (module docstring): ``forward(centres, pixels)`` with centres
    ``(batch, clusters, dim)`` and pixels ``(batch, pixels, kv_dim)`` returns the updated centres."""

    def __init__(self, dim: int, heads: int, **options):
        for name in ("pattern", "score", "normalizer", "context_parallel"):
            if options.get(name) is not None:
                raise ShapeError(f"KMeansCrossAttention sets its own {name}; drop {name}=")
        options.setdefault("backend", "reference")
        super().__init__(dim, heads, **options)

    def assignment_logits(self, centres: Tensor, pixels: Tensor) -> Tensor:
        """``Q_c K_p^T`` per head ``(batch, heads, clusters, pixels)`` (scaled), for mask losses."""
        q, k, _ = self.project(centres, pixels)
        k = k.repeat_interleave(self.heads // self.kv_heads, 1) if self.kv_heads != self.heads else k
        return q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5

    def forward(self, centres: Tensor, pixels: Tensor | None = None, **_):
        if pixels is None:
            raise ShapeError("KMeansCrossAttention needs pixels: forward(centres, pixels)")
        check_inputs(centres, pixels, self.dim, self.kv_dim)
        q, k, v = self.project(centres, pixels)
        out = attention(q, k, v, normalizer=ClusterArgmax(), backend=self.backend)
        return centres + self.combine(out, centres)
