"""PEM's prototype-based masked cross-attention (Cavagnero et al., 2024, "PEM: Prototype-based Efficient
MaskFormer for Image Segmentation", arXiv 2402.19422), after the authors' ``PEM_CA``.

Against MaskFormer's cross-attention, where each object query takes a softmax-weighted mix of every
(unmasked) pixel, PEM lets each query, in each head, take a single pixel: its **prototype**, the pixel
whose feature is most similar (cosine, per head) to the query - hard attention, the one-hot argmax of
the logits over the keys (``KeyArgmax``), run as a ``multihead.attention`` call. Pixel features come
from a local representation (batch norm, depthwise 3 x 3 convolution, linear), query keys from a
layer-normed linear map; both are L2-normalised over all channels before the heads split. The
prototypes ``P`` then update the queries without a softmax over pixels:
``out = final(normalize(proj(P * key), over the queries) * alpha + P) + queries``. A previous layer's
mask logits (``memory_mask``, pixels below 0 excluded) restrict where each query looks; a query whose
mask excludes every pixel looks everywhere (Mask2Former's rule; the authors' code lifts the mask only
when every query of an image is empty, and otherwise takes pixel 0 for an empty one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..normalizers import Normalizer
from ..patterns import KeySelection
from .attention import merge_heads, split_heads


class KeyArgmax(Normalizer):
    """Hard attention: each query row's weight is 1 on its highest-logit allowed key, 0 elsewhere (ties:
    the first). No gradient reaches the logits; the values get theirs through the chosen key."""

    name = "key_argmax"

    def weights(self, logits: Tensor, kv_len: int) -> Tensor:
        return F.one_hot(logits.detach().argmax(dim=-1), logits.shape[-1]).to(logits.dtype)

    def weights_(self, logits: Tensor, kv_len: int) -> Tensor:
        return logits.copy_(self.weights(logits, kv_len))


class LocalRepresentation(nn.Module):
    """PEM's pixel features: batch norm, depthwise 3 x 3 convolution, linear; ``(B, H, W, d)`` ->
    ``(B, H * W, d)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.conv(self.norm(x.permute(0, 3, 1, 2))).flatten(2).transpose(1, 2))


class PrototypeCrossAttention(nn.Module):
    """PEM's cross-attention (module docstring): ``forward(queries, features, memory_mask=None, pos=None,
    query_pos=None)`` with object queries ``(B, Q, dim)`` and a channels-last feature map
    ``(B, H, W, dim)``; ``memory_mask`` ``(B, Q, H, W)`` mask logits, ``pos`` / ``query_pos`` position
    embeddings added first. Returns the updated queries ``(B, Q, dim)``."""

    def __init__(self, dim: int, heads: int = 8, backend: str = "reference"):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShapeError(f"PrototypeCrossAttention.{name} must be a positive integer, got {value!r}")
        if dim % heads:
            raise ShapeError(f"PrototypeCrossAttention: heads ({heads}) must divide dim ({dim})")
        self.dim, self.heads, self.backend = dim, heads, backend
        self.to_query = LocalRepresentation(dim)
        self.to_key = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.proj, self.final = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def _pattern(self, memory_mask: Tensor | None, batch: int, queries: int, pixels: int, device):
        if memory_mask is None:
            return None
        if not isinstance(memory_mask, Tensor) or memory_mask.dim() != 4 or memory_mask.shape[:2] != (batch, queries) \
                or memory_mask.shape[2] * memory_mask.shape[3] != pixels:
            raise ShapeError(f"memory_mask must be mask logits (batch, queries, H, W) = ({batch}, {queries}, H, W), "
                             f"got {getattr(memory_mask, 'shape', memory_mask)!r}")
        allowed = memory_mask.detach().flatten(2) >= 0
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # an empty mask: every pixel
        indices = torch.arange(pixels, device=device).expand(batch, 1, queries, pixels)
        return KeySelection(indices, allowed.unsqueeze(1), pixels)

    def prototypes(self, key: Tensor, pixels: Tensor, pattern=None) -> Tensor:
        """Per head, each query's most similar pixel feature; ``(B, Q, dim)``."""
        q, kv = split_heads(key, self.heads), split_heads(pixels, self.heads)
        return merge_heads(attention(q, kv, kv, pattern=pattern, scale=1.0, normalizer=KeyArgmax(),
                                     backend=self.backend))

    def forward(self, queries: Tensor, features: Tensor, memory_mask: Tensor | None = None,
                pos: Tensor | None = None, query_pos: Tensor | None = None) -> Tensor:
        if not isinstance(queries, Tensor) or queries.dim() != 3 or queries.shape[-1] != self.dim:
            raise ShapeError(f"queries must be (batch, queries, {self.dim}), got {getattr(queries, 'shape', queries)!r}")
        if not isinstance(features, Tensor) or features.dim() != 4 or features.shape[-1] != self.dim \
                or features.shape[0] != queries.shape[0]:
            raise ShapeError(f"features must be a channels-last map (batch={queries.shape[0]}, H, W, {self.dim}), "
                             f"got {getattr(features, 'shape', features)!r}")
        batch, count = queries.shape[:2]
        x = features if pos is None else features + pos
        q = queries if query_pos is None else queries + query_pos
        pixels = F.normalize(self.to_query(x), dim=-1)
        key = F.normalize(self.to_key(q), dim=-1)
        pattern = self._pattern(memory_mask, batch, count, pixels.shape[1], pixels.device)
        prototypes = self.prototypes(key, pixels, pattern)
        out = F.normalize(self.proj(prototypes * key), dim=1) * self.alpha + prototypes
        return self.final(out) + queries

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"
