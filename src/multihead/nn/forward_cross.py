"""Forward cross attention (Zhang et al., 2022, "FcaFormer: Forward Cross Attention in Hybrid Vision
Transformer", arXiv 2211.07198).

Against standard self-attention, a block's keys and values are not only its own tokens: the tokens
that earlier blocks of the same stage produced are reused as extra "cross tokens". Each earlier
block's tokens are merged (``merge`` consecutive tokens averaged, then a depthwise convolution over
the merged sequence: the token merge and enhancement step, TME) and multiplied by a learnable scale
per channel (the learnable scale factors, LSF) before the key and value projections; the queries are
the block's own. One ``multihead.attention`` call with ``N`` queries and ``N + sum(merged)`` keys.
The paper's TME works on 2-D maps with strided depthwise convolutions; here it is 1-D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..models.block import TransformerBlock
from .attention import MultiHeadAttention, attend, check_inputs


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


class TokenMerge(nn.Module):
    """TME in 1-D: average ``merge`` consecutive tokens (the last group may be shorter), then add a
    depthwise convolution (kernel 3) of the merged tokens."""

    def __init__(self, dim: int, merge: int):
        super().__init__()
        self.merge = _positive("merge", merge)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1, groups=dim)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.avg_pool1d(x.transpose(1, 2), self.merge, ceil_mode=True, count_include_pad=False)
        return (pooled + self.conv(pooled)).transpose(1, 2)


class ForwardCrossAttention(MultiHeadAttention):
    """Self-attention whose keys and values also cover ``cross`` earlier blocks' tokens, each scaled by
    its learnable per-channel factor (LSF) - module docstring. ``forward(x, cross_tokens)`` takes the
    already merged earlier tokens, one ``(batch, tokens_i, dim)`` tensor per earlier block."""

    pattern_restricts_mixing = False  # the cross tokens are not ordered with the queries

    def __init__(self, dim: int, heads: int, cross: int, **options):
        for name in ("pattern", "kv_dim", "context_parallel", "position"):
            if options.get(name) is not None:
                raise ShapeError(f"ForwardCrossAttention does not take {name}=")
        super().__init__(dim, heads, **options)
        self.cross = cross if cross == 0 else _positive("cross", cross)
        self.scales = nn.Parameter(torch.ones(cross, dim)) if cross else None

    def forward(self, x: Tensor, cross_tokens=(), *, need_weights: bool = False):
        check_inputs(x, None, self.dim)
        cross_tokens = list(cross_tokens)
        if len(cross_tokens) != self.cross:
            raise ShapeError(f"ForwardCrossAttention was built for {self.cross} earlier blocks, got "
                             f"{len(cross_tokens)} cross token tensors")
        for t in cross_tokens:
            check_inputs(x, t, self.dim)
        scaled = [t * s for t, s in zip(cross_tokens, self.scales)] if cross_tokens else []
        context = torch.cat([x] + scaled, 1)
        q, k, v = self.project(x, context)
        out, weights = attend(self, q, k, v, need_weights=need_weights)
        y = self.combine(out, x)
        return (y, weights) if need_weights else y


class FcaStage(nn.Module):
    """A stage of ``depth`` pre-norm blocks in which block ``b`` attends to its tokens and the merged
    outputs of blocks ``0 .. b-1`` (the stage input counts as block 0's input, not a cross source).
    Maps ``(batch, tokens, dim)`` to the same shape."""

    pattern_restricts_mixing = False

    def __init__(self, dim: int, heads: int, depth: int = 2, merge: int = 4, mlp_ratio: float = 4.0, **options):
        super().__init__()
        self.depth = _positive("depth", depth)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, ForwardCrossAttention(dim, heads, b, **options), mlp_ratio) for b in range(depth))
        self.merges = nn.ModuleList(TokenMerge(dim, merge) for _ in range(depth - 1))

    def forward(self, x: Tensor) -> Tensor:
        merged = []
        for b, block in enumerate(self.blocks):
            x = block(x, cross_tokens=merged)
            if b < self.depth - 1:
                merged.append(self.merges[b](x))
        return x
