"""Block Transformer (Ho et al., 2024, "Block Transformer: Global-to-Local Language Modeling for Fast
Inference", arXiv 2406.02657): a language model whose attention is global only between blocks.

Against a standard decoder, no layer attends over all previous tokens:

- the **embedder** folds each block of ``block`` tokens into one block embedding (its token
  embeddings concatenated and projected);
- the **block decoder** (``block_depth`` layers) runs causal self-attention over the block
  embeddings - the coarse, global context - and its output at block ``b - 1`` is the context
  embedding of block ``b`` (a learned start vector for block 0);
- the **token decoder** (``token_depth`` layers) decodes each block alone: the sequence
  ``[context_b, x_{b,0}, ..., x_{b,L-2}]`` with causal attention inside the block only
  (``BlockLocal(block) & Causal()`` on all blocks packed side by side), position ``j`` predicting
  ``x_{b,j}``. Decoding a block needs its context embedding and its own tokens, no KV cache of the
  earlier blocks.

Every attention is a ``MultiHeadAttention`` (``multihead.attention`` with the patterns above).
``forward`` returns ``logits[:, t]`` scoring token ``t`` from the tokens before it (the first token
from the start context alone); ``loss`` is their cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..nn.attention import MultiHeadAttention
from ..patterns import BlockLocal, Causal
from .block import TransformerBlock


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


class BlockTransformerLM(nn.Module):
    """Global-to-local language model (module docstring).

    Args:
        vocab, dim, heads: vocabulary, width, attention heads of every layer.
        block: tokens per block (the sequence length must be a multiple of it).
        block_depth, token_depth: layers of the block decoder and of the token decoder.
        max_len: the longest sequence (learned block and in-block positions up to it).
        mlp_ratio, dropout: of the layers' MLPs.
    """

    def __init__(self, vocab: int, dim: int, heads: int, block: int, block_depth: int = 2, token_depth: int = 2,
                 max_len: int = 512, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.vocab, self.dim, self.block = _positive("vocab", vocab), _positive("dim", dim), _positive("block", block)
        self.max_len = _positive("max_len", max_len)
        _positive("heads", heads)
        _positive("block_depth", block_depth)
        _positive("token_depth", token_depth)
        if max_len % block:
            raise ShapeError(f"max_len ({max_len}) must be a multiple of block ({block})")
        self.token = nn.Embedding(vocab, dim)
        self.embedder = nn.Linear(block * dim, dim)
        self.block_position = nn.Embedding(max_len // block, dim)
        self.block_decoder = nn.ModuleList(
            TransformerBlock(dim, MultiHeadAttention(dim, heads, pattern=Causal()), mlp_ratio, dropout)
            for _ in range(block_depth))
        self.start = nn.Parameter(torch.zeros(dim))
        self.context = nn.Linear(dim, dim)
        self.local_position = nn.Embedding(block, dim)
        local = BlockLocal(block) & Causal()
        self.token_decoder = nn.ModuleList(
            TransformerBlock(dim, MultiHeadAttention(dim, heads, pattern=local), mlp_ratio, dropout)
            for _ in range(token_depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.token.weight
        for table in (self.token, self.block_position, self.local_position):
            nn.init.normal_(table.weight, std=0.02)

    def _check(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ShapeError(f"tokens must be an integer tensor (batch, length), got {shape}")
        length = tokens.shape[1]
        if length % self.block or not 0 < length <= self.max_len:
            raise ShapeError(f"the length ({length}) must be a positive multiple of block ({self.block}) up to "
                             f"max_len ({self.max_len}); pad the sequence")

    def contexts(self, tokens: Tensor) -> Tensor:
        """The context embedding of every block ``(batch, blocks, dim)``: the block decoder's output
        at the previous block (the start vector for block 0)."""
        batch, length = tokens.shape
        blocks = length // self.block
        embedded = self.token(tokens).view(batch, blocks, self.block * self.dim)
        x = self.embedder(embedded) + self.block_position(torch.arange(blocks, device=tokens.device))
        for layer in self.block_decoder:
            x = layer(x)
        return torch.cat([self.start.expand(batch, 1, self.dim), self.context(x[:, :-1])], 1)

    def forward(self, tokens: Tensor) -> Tensor:
        """``logits`` ``(batch, length, vocab)``: ``logits[:, t]`` scores token ``t`` given the tokens
        before it."""
        self._check(tokens)
        batch, length = tokens.shape
        blocks = length // self.block
        ctx = self.contexts(tokens)
        within = self.token(tokens).view(batch, blocks, self.block, self.dim)
        # each block's local sequence: its context embedding, then its tokens but the last
        x = torch.cat([ctx.unsqueeze(2), within[:, :, :-1]], 2)
        x = (x + self.local_position.weight).view(batch, length, self.dim)
        for layer in self.token_decoder:
            x = layer(x)
        return self.head(self.norm(x))

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean cross-entropy of every token given the tokens before it."""
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, self.vocab), tokens.reshape(-1))
