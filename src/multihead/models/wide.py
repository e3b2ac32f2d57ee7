"""Wide or deep at a fixed number of heads ("Wide Attention Is The Way Forward For Transformers?",
2022): the same total of attention heads, spread over fewer, wider layers or more, narrower ones.

``wide_lm(vocab, dim, total_heads, depth, head_dim)`` is a ``TransformerLM`` whose ``depth`` layers
have ``total_heads / depth`` heads of ``head_dim`` each: every choice of ``depth`` has the same number
of heads and the same attention parameters (``4 * dim * total_heads * head_dim`` with biases aside);
``depth=1`` is the paper's single wide layer. What differs is only how the heads are stacked (and the
number of MLPs, one per layer).
"""

from __future__ import annotations

from ..errors import ShapeError
from ..nn.attention import MultiHeadAttention
from .lm import TransformerLM


def wide_lm(vocab: int, dim: int, total_heads: int, depth: int, head_dim: int | None = None, **options) -> TransformerLM:
    """A language model with ``total_heads`` heads in ``depth`` layers (module docstring); ``options``
    go to ``TransformerLM`` (``max_len``, ``mlp_ratio``, ``dropout``, ``causal``)."""
    for name, value in (("total_heads", total_heads), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    if total_heads % depth:
        raise ShapeError(f"depth ({depth}) must divide total_heads ({total_heads}) so every layer has as many heads")
    if "attention" in options:
        raise ShapeError("wide_lm builds its own attention; drop attention=")
    head_dim = head_dim if head_dim is not None else max(1, dim // total_heads)
    return TransformerLM(vocab, dim, depth, total_heads // depth,
                         attention=lambda d, h, n: MultiHeadAttention(d, h, head_dim=head_dim), **options)
