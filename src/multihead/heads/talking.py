"""Talking-heads attention (Shazeer, Lan, Cheng, Ding & Hou, 2020, arXiv 2003.02436)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Topology


class TalkingHeadsAttention(Topology):
    """Talking-heads attention: learned linear maps across heads just before and after the softmax.

    Against standard multi-head attention, where head ``h``'s weights come from its own logits
    only, the logits of all heads are mixed by ``pre`` (``heads x heads``) before the softmax and the
    probabilities by ``post`` after it: ``J_h = q_h . k_h * scale``, ``L_g = sum_h J_h pre[h, g]``,
    ``W = softmax(L)`` (score and mask apply to ``L``), ``U_g = sum_h W_h post[h, g]``,
    ``o_g = U_g v_g``. The paper allows different head counts for q/k, softmax and v; here all three
    are ``heads`` (``kv_heads`` may still group the keys and values). Both maps start as the identity,
    so a fresh module computes multi-head attention; ``mix_pre``/``mix_post=False`` drops one of them.

    The mix ties the heads together, so it runs through ``multihead.attention(head_mix=(pre, post))``,
    which only backends declaring ``supports_head_mix`` (the dense reference) serve; with
    ``backend="auto"`` the others say why and the reference runs. ``need_weights`` returns the mixed
    weights ``U`` (rows need not sum to 1).
    """

    decodes_with_cache = True  # the head mixes act within each query row

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, mix_pre: bool = True,
                 mix_post: bool = True, **options):
        super().__init__(dim, heads, kv_heads, **options)
        self.pre_mix = nn.Parameter(torch.eye(heads)) if mix_pre else None
        self.post_mix = nn.Parameter(torch.eye(heads)) if mix_post else None

    def attention_options(self) -> dict:
        return {"head_mix": (self.pre_mix, self.post_mix)}

    def cost_note(self, seq_len: int) -> str:
        return "includes the head mixes; served by the reference backend only"

    def attention_flops(self, seq_len: int) -> int:
        mixes = (self.pre_mix is not None) + (self.post_mix is not None)
        return super().attention_flops(seq_len) + mixes * 2 * self.heads * self.heads * seq_len * seq_len
