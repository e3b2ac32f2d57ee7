"""Multi-scale retention (RetNet: Sun et al., 2023, "Retentive Network: A Successor to Transformer for
Large Language Models", arXiv 2307.08621)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..nn.attention import merge_heads
from .base import RecurrentAttention
from .engine import chunked_linear_attention, recurrent_linear_attention


def retnet_decays(heads: int) -> Tensor:
    """RetNet's per-head decays ``gamma_h = 1 - 2^(-5 - h)``: head 0 forgets fastest."""
    return 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64))


class Retention(RecurrentAttention):
    """Multi-scale retention: causal linear attention (no feature map, no softmax) whose weights
    decay with distance, ``o_i = sum_{j<=i} gamma_h^(i-j) (q_i . k_j) v_j``, a different
    ``gamma_h`` per head (``retnet_decays``), keys scaled by ``head_dim ** -0.5``. The heads are
    normalised separately (RetNet's GroupNorm) and gated by ``swish(x W_g)`` before the output
    projection. RetNet's xPos rotation is the ``position`` argument (e.g. ``RoPE(head_dim)``).
    The chunked form is RetNet's chunkwise retention; the recurrent form its recurrent retention.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None, *,
                 decays: Tensor | None = None, **options):
        super().__init__(dim, heads, kv_heads, head_dim, **options)
        decays = retnet_decays(heads) if decays is None else torch.as_tensor(decays, dtype=torch.float64)
        if decays.shape != (heads,) or not bool(((decays > 0) & (decays <= 1)).all()):
            raise ShapeError(f"decays must be {heads} values in (0, 1], got {decays.tolist()}")
        self.register_buffer("log_decay", decays.log().float())
        width = heads * self.head_dim
        self.gate = nn.Linear(dim, width, bias=self.q_proj.bias is not None)
        self.norm = nn.GroupNorm(heads, width)

    def mix(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens, initial_state):
        return self.run_form(chunked_linear_attention, recurrent_linear_attention, q, k, v,
                             scale=self.head_dim ** -0.5, log_decay=self.log_decay, cu_seqlens=cu_seqlens,
                             initial_state=initial_state)

    def combine(self, out: Tensor, x: Tensor) -> Tensor:
        merged = merge_heads(out)
        normed = self.norm(merged.flatten(0, 1)).view_as(merged)
        return self.out_proj(F.silu(self.gate(x)) * normed)
