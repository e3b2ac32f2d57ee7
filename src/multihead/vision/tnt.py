"""Transformer in Transformer (Han et al., 2021, "Transformer in Transformer", arXiv 2103.00112).

Against a ViT block, attention runs at two levels. Each of the ``n`` patches ("sentences",
embeddings of width ``sentence_dim``, after a class token) is cut into ``m`` sub-patches ("words",
width ``word_dim``). A TNT block runs

    Y <- Y + MSA_inner(LN(Y)),  Y <- Y + MLP(LN(Y))                   (words of each patch, shared weights)
    Z[1:] <- Z[1:] + FC(vec(Y_i))                                      (each patch adds its words)
    Z <- Z + MSA_outer(LN(Z)),  Z <- Z + MLP(LN(Z))                   (sentences)

The inner attention is one ``multihead.attention`` call over all words of all patches with
``BlockLocal(m)`` (a word sees only the words of its patch), the outer a plain one over the sentences.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ShapeError
from ..models.block import TransformerBlock
from ..nn.attention import MultiHeadAttention
from ..patterns import BlockLocal


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


class TNTBlock(nn.Module):
    """One TNT block (module docstring) on ``words`` ``(batch, patches, m, word_dim)`` and
    ``sentences`` ``(batch, patches + 1, sentence_dim)`` (class token first); returns both updated."""

    def __init__(self, word_dim: int, sentence_dim: int, words: int, inner_heads: int = 2, outer_heads: int = 4,
                 mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        self.word_dim, self.sentence_dim = _positive("word_dim", word_dim), _positive("sentence_dim", sentence_dim)
        self.words = _positive("words", words)
        self.inner = TransformerBlock(word_dim, MultiHeadAttention(word_dim, inner_heads, pattern=BlockLocal(words),
                                                                   backend=backend), mlp_ratio)
        self.norm = nn.LayerNorm(words * word_dim)
        self.fold = nn.Linear(words * word_dim, sentence_dim)
        self.outer = TransformerBlock(sentence_dim, MultiHeadAttention(sentence_dim, outer_heads, backend=backend),
                                      mlp_ratio)

    def forward(self, words: Tensor, sentences: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(words, Tensor) or words.dim() != 4 or words.shape[2:] != (self.words, self.word_dim):
            raise ShapeError(f"words must be (batch, patches, {self.words}, {self.word_dim}), got "
                             f"{getattr(words, 'shape', words)!r}")
        batch, patches = words.shape[:2]
        if (not isinstance(sentences, Tensor) or sentences.dim() != 3
                or sentences.shape != (batch, patches + 1, self.sentence_dim)):
            raise ShapeError(f"sentences must be (batch, patches + 1 = {patches + 1}, {self.sentence_dim}) with the "
                             f"class token first, got {getattr(sentences, 'shape', sentences)!r}")
        y = self.inner(words.reshape(batch, patches * self.words, self.word_dim)).view(words.shape)
        folded = self.fold(self.norm(y.flatten(2)))
        z = sentences + nn.functional.pad(folded, (0, 0, 1, 0))
        return y, self.outer(z)

    def extra_repr(self) -> str:
        return f"word_dim={self.word_dim}, sentence_dim={self.sentence_dim}, words={self.words}"
