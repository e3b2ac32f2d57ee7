"""Dynamic Mask Attention (Shi et al., 2025, "Trainable Dynamic Mask Sparse Attention", arXiv
2508.02124; the attention of the Doge models).

Against standard causal attention, every key gets a content-aware weight computed from the values,
``m_j = exp(A * softplus(v_j W))`` per key/value head (``W`` a learned projection of the token's values
of all key/value heads, ``A`` a learned scalar per key/value head, zero at start so every ``m_j = 1``).
Each query keeps only the ``window`` visible keys with the largest ``m_j`` (all of them while it sees
no more than ``window``) and adds ``m_j`` to their logits:

    a_ij = softmax_j( q_i . k_j * scale + m_j )   over the kept keys j <= i.

The choice carries no gradient; ``A`` and ``W`` learn through the bias of the kept keys. Ties in ``m``
go to the most recent keys (the paper leaves them to ``topk``). Here the kept keys are a
``KeySelection`` and the bias a ``KeyBias`` score on one ``multihead.attention`` call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..patterns import Causal, KeySelection
from ..scores.blocks import KeyBias
from .attention import MultiHeadAttention, attend, check_inputs


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


def dynamic_mask_request(mask: Tensor, q_len: int, heads: int, window: int):
    """``(pattern, score)`` of Dynamic Mask Attention for key weights ``mask`` ``(B, Hkv, kv_len)``
    and ``q_len`` queries aligned with the last keys, ``heads`` query heads."""
    window = _positive_int("window", window)
    if not isinstance(mask, Tensor) or mask.dim() != 3 or not mask.is_floating_point():
        raise ShapeError(f"mask must be a float tensor (batch, kv_heads, kv_len), got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    batch, kv_heads, kv_len = mask.shape
    if heads % kv_heads:
        raise ShapeError(f"kv heads of the mask ({kv_heads}) must divide the query heads ({heads})")
    if q_len > kv_len:
        raise ShapeError(f"Dynamic Mask Attention is causal: q_len ({q_len}) must not exceed kv_len ({kv_len})")
    group = heads // kv_heads
    score = KeyBias(mask.repeat_interleave(group, 1) if group > 1 else mask)
    positions = torch.arange(q_len, device=mask.device) + kv_len - q_len
    if window >= kv_len:
        return Causal(), score
    keys = torch.arange(kv_len, device=mask.device)
    with torch.no_grad():
        ranked = mask.detach()[:, :, None, :].expand(batch, kv_heads, q_len, kv_len)
        ranked = ranked.masked_fill(keys > positions[:, None], float("-inf")).flip(-1)
        values, order = ranked.sort(dim=-1, descending=True, stable=True)  # ties: the later key first
        indices = (kv_len - 1 - order[..., :window])
        valid = values[..., :window] > float("-inf")
        indices, slot = indices.sort(-1)
        valid = valid.gather(-1, slot)
    if group > 1:
        indices, valid = indices.repeat_interleave(group, 1), valid.repeat_interleave(group, 1)
    return KeySelection(indices, valid, kv_len), score


def dynamic_mask_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, window: int, *,
                           scale: float | None = None, dropout: float = 0.0, backend: str = "auto",
                           return_weights: bool = False):
    """Dynamic Mask Attention on ``(batch, heads, tokens, head_dim)`` tensors with per-key weights
    ``mask`` ``(batch, kv_heads, kv_len)`` (module docstring)."""
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ShapeError("q must be a (batch, heads, tokens, head_dim) tensor")
    if isinstance(mask, Tensor) and mask.dim() == 3 and isinstance(k, Tensor) and mask.shape != k.shape[:3]:
        raise ShapeError(f"mask {tuple(mask.shape)} must be (batch, kv_heads, kv_len) of k {tuple(k.shape)}")
    pattern, score = dynamic_mask_request(mask, q.shape[2], q.shape[1], window)
    return attention(q, k, v, pattern=pattern, score=score, scale=scale, dropout=dropout, backend=backend,
                     return_weights=return_weights)


class DynamicMaskAttention(MultiHeadAttention):
    """Dynamic Mask Attention as a causal self-attention module (module docstring): ``window`` keys
    per query, chosen and weighted by ``exp(A * softplus(v W))``. Takes the topology options of
    ``MultiHeadAttention`` (``kv_heads``, ``head_dim``, ``position``, ``bias``, ``dropout``,
    ``backend``)."""

    causal = True

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, window: int = 2048, **options):
        for name in ("pattern", "score", "normalizer", "kv_dim", "context_parallel"):
            if options.get(name) is not None:
                raise ShapeError(f"DynamicMaskAttention sets its own {name}; drop {name}=")
        super().__init__(dim, heads, kv_heads, **options)
        self.window = _positive_int("window", window)
        self.dt_proj = nn.Linear(self.kv_heads * self.head_dim, self.kv_heads, bias=False)
        self.A = nn.Parameter(torch.zeros(self.kv_heads))

    def key_weights(self, v: Tensor) -> Tensor:
        """``exp(A * softplus(v W))`` per key/value head: ``(B, Hkv, L)`` from values ``(B, Hkv, L, D)``."""
        dt = self.dt_proj(v.transpose(1, 2).flatten(2))  # (B, L, Hkv)
        return torch.exp(self.A * F.softplus(dt)).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False):
        if context is not None or key_padding_mask is not None:
            raise ShapeError("DynamicMaskAttention is causal self-attention: pass no context or key_padding_mask")
        check_inputs(x, None, self.dim)
        q, k, v = self.project(x, x)
        pattern, score = dynamic_mask_request(self.key_weights(v), q.shape[2], self.heads, self.window)
        out, weights = attend(self, q, k, v, need_weights=need_weights, pattern=pattern, score=score)
        y = self.combine(out, x)
        return (y, weights) if need_weights else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}"
