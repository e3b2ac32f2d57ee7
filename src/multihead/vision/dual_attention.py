"""The position and channel attention modules of DANet (Fu et al., 2019, "Dual Attention Network for
Scene Segmentation", arXiv 1809.02983), as the self-guided attention of Sinha & Dolz (2020,
"Multi-scale self-guided attention for medical image segmentation", arXiv 1906.02849) uses them,
after the latter's ``PAM_Module`` and ``CAM_Module``.

Against standard self-attention over the ``H x W`` positions of a channels-last map:

- **position attention** (``PositionAttention``) is one head whose queries and keys are 1x1 projections
  to ``dim / 8`` channels and whose values keep ``dim``, with *unscaled* logits ``q . k``; the output
  enters the residual through a learned scalar ``gamma`` that starts at 0: ``x + gamma * attn(x)``;
- **channel attention** (``ChannelAttention``) has the ``dim`` channels as its tokens (each a vector
  of ``H * W`` values), no projections, and the weights ``softmax(max_j e_ij - e_ij)`` of the energies
  ``e = X X^T``: the row maximum cancels in the softmax, so they are ``softmax(-e)``, the attention of
  the queries ``-X`` over the keys ``X``; again ``x + gamma * attn(x)``, ``gamma`` from 0.

Each is one ``multihead.attention`` call (any backend). The multi-scale network around them (the
semantic encoder-decoder and its guiding losses) is not built.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from .base import check_feature_map


def _check(owner: str, dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ShapeError(f"{owner}.dim must be a positive integer, got {dim!r}")
    return dim


class PositionAttention(nn.Module):
    """DANet's position attention module (module docstring) on ``(batch, H, W, dim)``; ``reduction``
    divides ``dim`` for the query and key channels (8 in the paper)."""

    def __init__(self, dim: int, reduction: int = 8, backend: str = "auto"):
        super().__init__()
        self.dim = _check("PositionAttention", dim)
        if isinstance(reduction, bool) or not isinstance(reduction, int) or not 1 <= reduction <= dim:
            raise ShapeError(f"PositionAttention.reduction must be an integer in [1, dim={dim}], got {reduction!r}")
        self.backend = backend
        self.query, self.key = nn.Linear(dim, dim // reduction), nn.Linear(dim, dim // reduction)
        self.value = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x, self.dim, type(self).__name__)
        tokens = x.flatten(1, 2).unsqueeze(1)  # one head over the H * W positions
        out = attention(self.query(tokens), self.key(tokens), self.value(tokens), scale=1.0, backend=self.backend)
        return x + self.gamma * out.view(x.shape)


class ChannelAttention(nn.Module):
    """DANet's channel attention module (module docstring) on ``(batch, H, W, dim)``."""

    def __init__(self, dim: int, backend: str = "auto"):
        super().__init__()
        self.dim = _check("ChannelAttention", dim)
        self.backend = backend
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x, self.dim, type(self).__name__)
        channels = x.flatten(1, 2).transpose(1, 2).unsqueeze(1)  # (B, 1, dim, H * W): channels as tokens
        out = attention(-channels, channels, channels, scale=1.0, backend=self.backend)
        return x + self.gamma * out[:, 0].transpose(1, 2).view(x.shape)
