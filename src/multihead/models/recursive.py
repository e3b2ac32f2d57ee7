"""Sliced Recursive Transformer (Shen, Liu & Xing, 2021, "Sliced Recursive Transformer", arXiv
2111.05297): one block's weights applied several times, its self-attention sliced into groups.

Against a stack of distinct blocks, ``SlicedRecursiveBlock`` applies one pre-norm block (its
``MultiHeadAttention`` and MLP) ``len(groups)`` times - recursion, no new block parameters - with a
small non-shared linear projection after every pass but the last (the paper's NLL layers, which keep
the recursion from collapsing into an identity). Pass ``t`` slices the tokens into ``groups[t]``
contiguous groups and attends within each (``BlockLocal(ceil(N / groups[t]))`` on the shared
attention), so a pass with ``g`` groups costs about ``1 / g`` of full attention; ``groups[t] = 1`` is
full attention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..nn.attention import MultiHeadAttention, attend, check_inputs
from ..patterns import BlockLocal
from .block import TransformerBlock


class SlicedRecursiveBlock(nn.Module):
    """``len(groups)`` recursive passes of one block, pass ``t`` with attention in ``groups[t]`` slices
    (module docstring). Maps ``(batch, tokens, dim)`` to the same shape (the block's output, residuals
    included)."""

    pattern_restricts_mixing = False

    def __init__(self, dim: int, heads: int, groups=(1, 1), mlp_ratio: float = 4.0, **options):
        super().__init__()
        groups = tuple(groups)
        if not groups or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in groups):
            raise ShapeError(f"groups must be a non-empty sequence of positive integers, got {groups!r}")
        if "pattern" in options:
            raise ShapeError("SlicedRecursiveBlock sets its own patterns; drop pattern=")
        self.dim, self.groups = dim, groups
        self.block = TransformerBlock(dim, MultiHeadAttention(dim, heads, **options), mlp_ratio)
        self.between = nn.ModuleList(nn.Linear(dim, dim) for _ in groups[1:])
        for layer in self.between:  # start as the identity
            nn.init.eye_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _attention(self, x: Tensor, pattern) -> Tensor:
        module = self.block.attention
        q, k, v = module.project(x, x)
        out, _ = attend(module, q, k, v, pattern=pattern)
        return module.combine(out, x)

    def forward(self, x: Tensor) -> Tensor:
        check_inputs(x, None, self.dim)
        for t, g in enumerate(self.groups):
            pattern = None if g == 1 else BlockLocal(max(1, math.ceil(x.shape[1] / g)))
            x = x + self._attention(self.block.norm1(x), pattern)
            x = x + self.block.mlp(self.block.norm2(x))
            if t < len(self.between):
                x = self.between[t](x)
        return x
