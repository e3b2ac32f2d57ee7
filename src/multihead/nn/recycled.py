"""Recycled Attention (Xu et al., 2024, "Recycled Attention: Efficient inference for long-context
language models", arXiv 2411.05787).

Against standard causal attention in decoding, not every generated token reads the whole context:
every ``stride``-th decoding step is a full step (the query attends to every earlier key, and its
attention weights are kept), and the steps in between attend only to the ``top_k`` keys before it
that the last full step weighted most - "recycling" its attention pattern - plus every key from that
full step's own token on (the tokens generated since). The choice is per key/value head: the full step's weights of the
query heads sharing a key/value head are summed (one reduced cache per key/value head, as a GQA
cache would hold it), and it carries no gradient.

Conventions: the first ``prompt`` tokens are the prompt (prefilled with causal attention); decoding
step ``t`` is the token at position ``prompt + t``, full when ``t % stride == 0``. The whole sequence
runs in three ``multihead.attention`` calls: the prompt (``Causal``), the full steps (their prefixes
as key lists, with weights returned by the reference backend), and the partial steps (their recycled
keys as a ``KeySelection``, which the block-sparse backend gathers: ``top_k + stride`` keys a row).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeError
from ..functional import attention
from ..patterns import Causal, KeySelection
from .attention import MultiHeadAttention, check_inputs


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ShapeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check(q: Tensor, k: Tensor, v: Tensor, prompt: int, stride: int, top_k: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ShapeError(f"{name} must be a (batch, heads, tokens, head_dim) tensor")
    if q.shape[2] != k.shape[2] or k.shape[:3] != v.shape[:3] or q.shape[1] % k.shape[1]:
        raise ShapeError(f"recycled attention is causal self-attention over one sequence: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)} need equal lengths and kv heads dividing heads")
    _positive_int("stride", stride)
    _positive_int("top_k", top_k)
    _positive_int("prompt", prompt)
    if prompt > q.shape[2]:
        raise ShapeError(f"prompt ({prompt}) exceeds the sequence ({q.shape[2]} tokens)")


def recycled_rows(length: int, prompt: int, stride: int, device=None) -> tuple[Tensor, Tensor]:
    """Positions of the full decoding steps and of the partial ones (both ascending)."""
    positions = torch.arange(prompt, length, device=device)
    full = (positions - prompt) % stride == 0
    return positions[full], positions[~full]


def recycled_attention(q: Tensor, k: Tensor, v: Tensor, *, prompt: int, stride: int, top_k: int,
                       scale: float | None = None, backend: str = "auto", dropout: float = 0.0) -> Tensor:
    """Recycled Attention over one causal sequence ``(batch, heads, tokens, head_dim)`` (module
    docstring): the prompt prefilled, then full steps every ``stride`` tokens and recycled ``top_k``
    keys in between. Returns the output ``(batch, heads, tokens, head_dim_v)``."""
    _check(q, k, v, prompt, stride, top_k)
    batch, heads, length, _ = q.shape
    kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    device = q.device
    out = q.new_empty(batch, heads, length, v.shape[-1])
    out[:, :, :prompt] = attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], pattern=Causal(),
                                   scale=scale, backend=backend, dropout=dropout)
    full, partial = recycled_rows(length, prompt, stride, device)
    if full.numel() == 0:
        return out
    keys = torch.arange(length, device=device)
    # full steps: every key up to the row's own position, weights kept for the choice
    prefix = keys.expand(full.numel(), length)
    lists = KeySelection(prefix.expand(batch, heads, -1, -1), (prefix <= full[:, None]).expand(batch, heads, -1, -1),
                         length)
    full_out, weights = attention(q[:, :, full], k, v, pattern=lists, scale=scale, backend="reference",
                                  dropout=dropout, return_weights=True)
    out[:, :, full] = full_out
    if partial.numel() == 0:
        return out
    with torch.no_grad():  # per key/value head: the summed weights of its query heads
        shared = weights.detach().view(batch, kv_heads, group, full.numel(), length).sum(2)
        # the top_k keys before each full step's own token (that one and later ones are kept anyway)
        shared = shared.masked_fill(keys >= full[:, None], float("-inf"))
        top = shared.topk(min(top_k, length), dim=-1)
        chosen, order = top.indices.sort(-1)  # ascending lists: KeySelection's fast check
        chosen_ok = top.values.gather(-1, order) > float("-inf")
        last_full = (partial - prompt) // stride  # index of each partial row's full step
        since = full[last_full]  # its position
        recent = since[:, None] + torch.arange(stride, device=device)
        recent_ok = recent <= partial[:, None]
        indices = torch.cat([chosen[:, :, last_full], recent.expand(batch, kv_heads, -1, -1)], -1)
        valid = torch.cat([chosen_ok[:, :, last_full], recent_ok.expand(batch, kv_heads, -1, -1)], -1)
        indices = indices.clamp(max=length - 1).repeat_interleave(group, 1)
        valid = valid.repeat_interleave(group, 1)
    out[:, :, partial] = attention(q[:, :, partial], k, v, pattern=KeySelection(indices, valid, length), scale=scale,
                                   backend=backend, dropout=dropout)
    return out


class RecycledAttention(MultiHeadAttention):
    """Recycled Attention as a causal self-attention module (module docstring): the first
    ``prompt`` tokens (an int, or a fraction of the sequence) are prefilled; after them a full step
    every ``stride`` tokens, and the ``top_k`` keys it weighted most (per key/value head) recycled
    by the tokens until the next one. Takes the topology options of ``MultiHeadAttention``
    (``kv_heads``, ``head_dim``, ``position``, ``bias``, ``dropout``, ``backend``)."""

    causal = True

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, stride: int = 8, top_k: int = 64,
                 prompt: int | float = 0.5, **options):
        for name in ("pattern", "score", "normalizer", "kv_dim", "context_parallel"):
            if options.get(name) is not None:
                raise ShapeError(f"RecycledAttention sets its own {name}; drop {name}=")
        super().__init__(dim, heads, kv_heads, **options)
        self.stride, self.top_k = _positive_int("stride", stride), _positive_int("top_k", top_k)
        if isinstance(prompt, float):
            if not 0.0 < prompt <= 1.0:
                raise ShapeError(f"prompt as a fraction must lie in (0, 1], got {prompt!r}")
        else:
            _positive_int("prompt", prompt)
        self.prompt = prompt

    def prompt_length(self, tokens: int) -> int:
        if isinstance(self.prompt, float):
            return max(1, int(tokens * self.prompt))
        return min(self.prompt, tokens)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False):
        if context is not None or key_padding_mask is not None or need_weights:
            raise ShapeError("RecycledAttention is causal self-attention: pass no context, key_padding_mask "
                             "or need_weights")
        check_inputs(x, None, self.dim)
        q, k, v = self.project(x, x)
        out = recycled_attention(q, k, v, prompt=self.prompt_length(x.shape[1]), stride=self.stride,
                                 top_k=self.top_k, backend=self.backend,
                                 dropout=self.dropout if self.training else 0.0)
        return self.combine(out, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stride={self.stride}, top_k={self.top_k}, prompt={self.prompt}"


__all__ = ["RecycledAttention", "recycled_attention", "recycled_rows"]
