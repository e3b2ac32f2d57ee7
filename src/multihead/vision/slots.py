"""Attention on semantic slots (GLMix: Zhu et al., 2024, "Revisiting the Integration of Convolution and
Attention for Vision Backbone", arXiv 2411.14429): convolutions on the fine pixel grid, multi-head
self-attention on a small set of semantic slots made by differentiable soft clustering, and a
dispatch back to the grid.

Against attention over all ``H x W`` positions, attention runs over ``slots`` tokens:

    A = softmax_over_slots( norm(x) . norm(C)^T / tau )          (soft clustering; C learned centres)
    S = (A^T x) / (A^T 1)                                        (each slot: the mean of its pixels)
    S' = S + MHSA(S)                                             (``multihead.attention`` over the slots)
    y = A S' + DWConv(x)                                         (dispatch back, plus the local branch)

so the global mixing costs ``O(HW * slots + slots^2)``. The module's output is ``y`` minus the input
(the update), on a channels-last map ``(batch, H, W, dim)``. The clustering here (cosine similarity
to learned centres, a softmax over the slots, mean-pooled slots, the same weights to dispatch) is
this library's reading of "fully differentiable soft clustering and dispatching"; the paper's exact
modules are not reproduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..nn.attention import MultiHeadAttention
from .base import check_feature_map


class SlotAttention2d(nn.Module):
    """Global mixing through ``slots`` soft-clustered tokens plus a depthwise ``kernel x kernel``
    convolution on the grid (module docstring). ``**options`` go to the ``MultiHeadAttention`` over
    the slots."""

    pattern_restricts_mixing = False  # the soft clustering mixes every position

    def __init__(self, dim: int, heads: int, slots: int = 64, kernel: int = 3, temperature: float = 0.1, **options):
        super().__init__()
        for name, value in (("slots", slots), ("kernel", kernel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShapeError(f"{name} must be a positive integer, got {value!r}")
        if kernel % 2 == 0:
            raise ShapeError(f"kernel must be odd, got {kernel}")
        if not temperature > 0:
            raise ShapeError(f"temperature must be positive, got {temperature!r}")
        self.dim, self.temperature = dim, float(temperature)
        self.centres = nn.Parameter(torch.randn(slots, dim))
        self.attention = MultiHeadAttention(dim, heads, **options)
        self.local = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def assignment(self, tokens: Tensor) -> Tensor:
        """Soft assignment of every token to every slot ``(batch, tokens, slots)`` (rows sum to 1)."""
        logits = F.normalize(tokens, dim=-1) @ F.normalize(self.centres, dim=-1).T / self.temperature
        return logits.softmax(-1)

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x, self.dim, type(self).__name__)
        tokens = x.flatten(1, 2)
        a = self.assignment(tokens)
        slots = (a.transpose(1, 2) @ tokens) / a.sum(1).unsqueeze(-1).clamp_min(1e-6)
        slots = slots + self.attention(slots)
        y = (a @ slots).view(x.shape) + self.local(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return y - x
