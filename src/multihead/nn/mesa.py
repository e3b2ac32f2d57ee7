"""Memory-saving attention training in the manner of Mesa (Pan et al., 2021, "Mesa: A Memory-saving
Training Framework for Transformers", arXiv 2111.11124).

Against standard attention nothing changes in the forward pass: it is computed exactly. What changes
is what autograd keeps for the backward pass: instead of the backend's saved tensors (SDPA keeps q,
k, v, the output and the log-sum-exps; the reference keeps the ``N x N`` weights), only q, k and v
are kept, quantised to 8 bits with one scale per (batch element, head) - Mesa's head-wise
quantisation (its scales are running estimates; here each head's absolute maximum of the call).
The backward pass dequantises them, recomputes the attention through ``multihead.attention`` and
differentiates that, so the gradients are those of the attention at the dequantised q, k, v: exact
up to the 8-bit rounding. ``saved_bytes`` measures what a call keeps for backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeError
from ..functional import attention
from .attention import MultiHeadAttention, check_inputs

#: Levels of the signed 8-bit code: values are rounded to ``scale * [-127, 127]``.
LEVELS = 127


def quantize_per_head(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` ``(B, H, L, D)`` as int8 codes and a float scale per (batch element, head)."""
    scale = x.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny) / LEVELS
    return torch.round(x.detach() / scale).clamp(-LEVELS, LEVELS).to(torch.int8), scale


def dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    return codes.to(scale.dtype) * scale


class _MesaAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, options):
        with torch.no_grad():
            out = attention(q, k, v, **options)
        codes = [quantize_per_head(t) for t in (q, k, v)]
        ctx.save_for_backward(*(c for c, _ in codes), *(s for _, s in codes))
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx, dout):
        qc, kc, vc, qs, ks, vs = ctx.saved_tensors
        inputs = [dequantize(c, s).requires_grad_() for c, s in ((qc, qs), (kc, ks), (vc, vs))]
        with torch.enable_grad():
            out = attention(*inputs, **ctx.options)
        dq, dk, dv = torch.autograd.grad(out, inputs, dout)
        return dq, dk, dv, None


def mesa_attention(q: Tensor, k: Tensor, v: Tensor, *, pattern=None, score=None, scale: float | None = None,
                   normalizer=None, backend: str = "auto") -> Tensor:
    """``multihead.attention(q, k, v, ...)`` computed exactly, keeping only 8-bit per-head q, k, v
    for the backward pass (module docstring). Scores with trainable parameters and dropout are
    refused: the recomputation differentiates q, k and v only, and would redraw dropout."""
    if score is not None and any(p.requires_grad for p in getattr(score, "parameters", lambda: [])()):
        raise ShapeError("mesa_attention recomputes the attention for q, k and v only; a score with trainable "
                         "parameters would get no gradient: freeze it or use multihead.attention")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ShapeError(f"{name} must be a float (batch, heads, tokens, head_dim) tensor")
    options = dict(pattern=pattern, score=score, scale=scale, normalizer=normalizer, backend=backend)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v)):
        return attention(q, k, v, **options)
    return _MesaAttention.apply(q, k, v, options)


def saved_bytes(fn, *args, **kwargs) -> tuple[object, int]:
    """Run ``fn(*args, **kwargs)`` and count the bytes autograd keeps for backward (each saved
    tensor's storage once): ``(result, bytes)``."""
    storages = {}

    def pack(t):
        if isinstance(t, Tensor):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args, **kwargs)
    return result, sum(storages.values())


class MesaAttention(MultiHeadAttention):
    """``MultiHeadAttention`` whose attention keeps 8-bit per-head q, k, v for backward instead of
    the backend's tensors (module docstring): the same forward, gradients up to the rounding. Takes
    every option of ``MultiHeadAttention`` except ``dropout`` and ``context_parallel``; a learnable
    score must be frozen."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, **options):
        if options.get("dropout", 0.0) or options.get("context_parallel") is not None:
            raise ShapeError("MesaAttention recomputes the attention in backward: drop dropout= and context_parallel=")
        super().__init__(dim, heads, kv_heads, **options)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False):
        if key_padding_mask is not None or need_weights:
            raise ShapeError("MesaAttention serves no key_padding_mask or need_weights; pack the batch or use "
                             "MultiHeadAttention")
        context = check_inputs(x, context, self.dim, self.kv_dim)
        q, k, v = self.project(x, context)
        out = mesa_attention(q, k, v, pattern=self.pattern, score=self.score_for(q, k), normalizer=self.normalizer,
                             backend=self.backend)
        return self.combine(out, x)
