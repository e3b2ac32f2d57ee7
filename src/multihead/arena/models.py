"""Whole models the arena trains beside the catalog's attention variants (which it runs inside
``TransformerLM``): models whose change is the architecture around attention.

Each entry builds, for a sequence task, a module mapping tokens ``(batch, length)`` to logits
``(batch, length, vocab)`` where position ``t`` reads the tokens up to ``t`` (the arena's
convention; ``check_causal`` verifies it before training).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MultiheadError
from ..models.block_lm import BlockTransformerLM
from ..models.wide import wide_lm


class ReadsThrough(nn.Module):
    """A language model whose ``logits[:, t]`` scores token ``t`` from the tokens before it (Block
    Transformer), shifted to the arena's convention: the input is extended by padding (one token, then
    up to a multiple of ``multiple``) and ``logits[:, t + 1]`` becomes the prediction at ``t``."""

    def __init__(self, model: nn.Module, multiple: int, pad: int = 0):
        super().__init__()
        self.model, self.multiple, self.pad = model, multiple, pad

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        extra = 1 + (-(length + 1)) % self.multiple
        return self.model(F.pad(tokens, (0, extra), value=self.pad))[:, 1:length + 1]


def _padded(length: int, multiple: int) -> int:
    return length + 1 + (-(length + 1)) % multiple


def block_transformer(task, settings) -> nn.Module:
    """Block Transformer: blocks of 4 tokens, half the layers in the block decoder, half (at least one)
    in the token decoder."""
    block = 4
    block_depth = max(1, settings.depth // 2)
    return ReadsThrough(BlockTransformerLM(task.vocab, settings.dim, settings.heads, block, block_depth,
                                           max(1, settings.depth - block_depth),
                                           max_len=_padded(task.length, block)), block)


def wide_attention(task, settings) -> nn.Module:
    """Wide attention: the heads of every layer (``heads x depth``) in one layer of head width
    ``dim / heads``, the paper's wide model against the deep ``mha`` baseline."""
    return wide_lm(task.vocab, settings.dim, settings.heads * settings.depth, 1,
                   head_dim=settings.dim // settings.heads, max_len=task.length)


#: Model names ``multihead arena --variants`` accepts besides the catalog's.
MODELS = {"block_transformer": block_transformer, "wide_attention": wide_attention}


def build_arena_model(name: str, task, settings) -> nn.Module:
    if not hasattr(task, "vocab"):
        raise MultiheadError(f"{name} is a language model; the {task.name} task classifies images")
    return MODELS[name](task, settings)
