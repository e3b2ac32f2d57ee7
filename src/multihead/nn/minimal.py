"""The attention ablations of "Reducing the Transformer Architecture to a Minimum" (2024): how much
of a head's parametrisation can go.

Against standard multi-head attention (separate ``W_Q``, ``W_K``, ``W_V`` and ``W_O``):

- ``qk="collapsed"``: ``W_Q`` and ``W_K`` become one matrix per head, the logit is
  ``x_i^T W_h x_j`` (queries ``x W_h``, keys the input itself) - the product ``W_Q W_K^T`` learned
  directly;
- ``qk="symmetric"``: one projection serves as both, ``q = k = x W_h``, so the similarity is
  symmetric (half the parameters of separate ``W_Q``, ``W_K``);
- ``values=False``: no ``W_V`` and no ``W_O``: head ``h`` mixes its slice of the input channels
  and the heads are concatenated.

Every form runs as one ``multihead.attention`` call with the module's pattern, score and backend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from .attention import MultiHeadAttention, attend, check_inputs, merge_heads, split_heads

QK_FORMS = ("separate", "collapsed", "symmetric")


class MinimalAttention(MultiHeadAttention):
    """Multi-head self-attention with the ablations above (module docstring): ``qk`` one of
    ``"separate"``, ``"collapsed"``, ``"symmetric"``; ``values`` keeps or drops ``W_V`` and ``W_O``.
    ``heads`` must divide ``dim``; ``head_dim`` is ``dim // heads`` (the input slices when
    ``values=False``); other options as ``MultiHeadAttention`` (not ``kv_heads``, ``kv_dim``)."""

    def __init__(self, dim: int, heads: int, *, qk: str = "separate", values: bool = True, **options):
        if qk not in QK_FORMS:
            raise ShapeError(f"qk must be one of {QK_FORMS}, got {qk!r}")
        for name in ("kv_heads", "kv_dim", "head_dim", "context_parallel"):
            if options.get(name) is not None:
                raise ShapeError(f"MinimalAttention does not take {name}=")
        super().__init__(dim, heads, **options)
        self.qk, self.values = qk, bool(values)
        d = self.head_dim
        if qk != "separate":
            del self.q_proj, self.k_proj
            self.qk_weight = nn.Parameter(torch.randn(heads, d, d) / math.sqrt(d))
        if not self.values:
            del self.v_proj, self.out_proj

    def project(self, x: Tensor, context: Tensor, *, positions=None):
        if self.qk == "separate":
            q, k = split_heads(self.q_proj(x), self.heads), split_heads(self.k_proj(context), self.heads)
        else:
            xs = split_heads(x, self.heads)  # (B, H, L, d): each head's slice of the channels
            mapped = torch.einsum("bhld,hde->bhle", xs, self.qk_weight.to(x.dtype))
            q, k = (mapped, xs) if self.qk == "collapsed" else (mapped, mapped)
        v = split_heads(self.v_proj(context), self.heads) if self.values else split_heads(context, self.heads)
        if self.position is not None:
            q, k = self.position(q, k) if positions is None else self.position(q, k, positions, positions)
        return q, k, v

    def combine(self, out: Tensor, x: Tensor) -> Tensor:
        return self.out_proj(merge_heads(out)) if self.values else merge_heads(out)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False):
        if context is not None:
            raise ShapeError("MinimalAttention is self-attention (the collapsed and symmetric forms read the "
                             "input as keys): pass no context")
        check_inputs(x, None, self.dim)
        q, k, v = self.project(x, x)
        out, weights = attend(self, q, k, v, key_padding_mask=key_padding_mask, need_weights=need_weights)
        y = self.combine(out, x)
        return (y, weights) if need_weights else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", qk={self.qk!r}, values={self.values}"
