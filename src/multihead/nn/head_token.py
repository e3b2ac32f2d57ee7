"""DHVT's head tokens (Lu et al., 2022, "Bridging the Gap Between Vision Transformers and Convolutional
Neural Networks on Small Datasets", arXiv 2210.05958): HI-MHSA, after the authors' ``HI_Attention``.

Against standard self-attention, the input's channels are cut into one group per head and every group
is summarised by a **head token**: the group averaged over the tokens ``(C / h)``, projected to the
full width ``C``, then, seen again as ``h`` groups of ``C / h``, layer-normalised per group, passed
through GELU, and given a learned position embedding per head token. The ``h`` head tokens join the
sequence, multi-head attention runs over all ``N + h`` tokens (one ``multihead.attention`` call, any
backend), and afterwards the head tokens' outputs are averaged and added to the class token (token
``class_index``); the head tokens leave the sequence. So channel groups that each head would read
alone interact through tokens every position can attend to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from .attention import MultiHeadAttention, check_inputs


class HeadTokenAttention(MultiHeadAttention):
    """HI-MHSA (module docstring) on ``(batch, tokens, dim)`` whose token ``class_index`` (0: first, as
    DHVT; -1: last, a post-sequence class token) is the class token. Topology options as
    ``MultiHeadAttention`` (self-attention only)."""

    pattern_restricts_mixing = False  # the head tokens average every token

    def __init__(self, dim: int, heads: int, *, class_index: int = 0, **options):
        for name in ("pattern", "kv_dim", "context_parallel", "head_dim"):
            if options.get(name) is not None:
                raise ShapeError(f"HeadTokenAttention sets its own {name}; drop {name}=")
        super().__init__(dim, heads, **options)
        if isinstance(class_index, bool) or not isinstance(class_index, int):
            raise ShapeError(f"class_index must be an integer (0: first token, -1: last), got {class_index!r}")
        self.class_index = class_index
        group = dim // heads
        self.head_proj = nn.Linear(group, dim)
        self.head_norm = nn.LayerNorm(group)
        self.head_position = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, heads, dim), std=0.02))

    def head_tokens(self, x: Tensor) -> Tensor:
        """The ``heads`` head tokens ``(batch, heads, dim)`` of ``x``."""
        batch, _, dim = x.shape
        groups = x.view(batch, x.shape[1], self.heads, dim // self.heads).mean(1)  # (B, heads, dim / heads)
        tokens = self.head_proj(groups).view(batch, self.heads, self.heads, dim // self.heads)
        return F.gelu(self.head_norm(tokens)).flatten(2) + self.head_position.to(x.dtype)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False):
        if context is not None or key_padding_mask is not None or need_weights:
            raise ShapeError("HeadTokenAttention is self-attention over the tokens and head tokens: pass no "
                             "context, key_padding_mask or need_weights")
        check_inputs(x, None, self.dim)
        tokens = x.shape[1]
        if not -tokens <= self.class_index < tokens:
            raise ShapeError(f"class_index {self.class_index} is outside the {tokens} tokens")
        y = super().forward(torch.cat([x, self.head_tokens(x)], 1))
        out, merged = y[:, :tokens], y[:, tokens:].mean(1)
        index = self.class_index % tokens
        return torch.cat([out[:, :index], (out[:, index] + merged).unsqueeze(1), out[:, index + 1:]], 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", class_index={self.class_index}"
