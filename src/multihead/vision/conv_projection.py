"""CvT's convolutional projection (Wu et al., 2021, "CvT: Introducing Convolutions to Vision
Transformers", arXiv 2103.15808).

Against standard attention on a feature map, q, k and v are not linear maps of each token alone:
each is a depthwise ``kernel x kernel`` convolution of the map followed by batch normalisation,
then the usual linear projection. Queries keep the full resolution; keys and values are convolved
with stride ``kv_stride`` (CvT's squeezed projection: ``kv_stride^2`` times fewer keys). The
attention itself - queries over all the (subsampled) keys - is one ``multihead.attention`` call.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..nn.attention import split_heads
from ..patterns.base import check_int
from .base import GridAttention, check_feature_map


def _depthwise(dim: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim, kernel, stride, padding=kernel // 2, groups=dim, bias=False),
                         nn.BatchNorm2d(dim))


class ConvProjectionAttention(GridAttention):
    """Multi-head attention on a ``(batch, H, W, dim)`` map with CvT's convolutional projections
    (module docstring): depthwise conv + batch norm before each of the q, k, v projections, keys and
    values at stride ``kv_stride``. ``kernel`` must be odd. Takes ``MultiHeadAttention``'s options
    except ``pattern``, ``score`` and ``position`` (the keys sit on a coarser grid)."""

    def __init__(self, dim: int, heads: int, kernel: int = 3, kv_stride: int = 2, **options):
        super().__init__(dim, heads, **options)
        check_int("ConvProjectionAttention.kernel", kernel, minimum=1)
        check_int("ConvProjectionAttention.kv_stride", kv_stride, minimum=1)
        if kernel % 2 == 0:
            raise ShapeError(f"ConvProjectionAttention.kernel must be odd (same padding), got {kernel}")
        self.refuse("pattern", "score", "position")
        self.kernel, self.kv_stride = kernel, kv_stride
        self.conv_q = _depthwise(dim, kernel, 1)
        self.conv_k = _depthwise(dim, kernel, kv_stride)
        self.conv_v = _depthwise(dim, kernel, kv_stride)

    def forward(self, x: Tensor, *, need_weights: bool = False):
        check_feature_map(x, self.dim, type(self).__name__)
        image = x.permute(0, 3, 1, 2)
        tokens = [conv(image).flatten(2).transpose(1, 2) for conv in (self.conv_q, self.conv_k, self.conv_v)]
        q = split_heads(self.q_proj(tokens[0]), self.heads)
        k = split_heads(self.k_proj(tokens[1]), self.kv_heads)
        v = split_heads(self.v_proj(tokens[2]), self.kv_heads)
        result = attention(q, k, v, dropout=self.dropout if self.training else 0.0, backend=self.backend,
                           return_weights=need_weights)
        out, weights = result if need_weights else (result, None)
        y = self.combine(out, x.flatten(1, 2)).view(x.shape)
        return (y, weights) if need_weights else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel}, kv_stride={self.kv_stride}"
