"""Landmark Attention (Mohtashami & Jaggi, 2023, "Landmark Attention: Random-Access Infinite Context
Length for Transformers", arXiv 2305.16300).

The sequence is cut into blocks of ``block`` tokens whose last token is a landmark (``insert_landmarks``
puts one after every ``block - 1`` tokens). Against standard causal attention, query ``i`` (in block
``c``) weighs a key ``j`` of an earlier block ``g`` by a grouped softmax:

    a_ij = exp(s_ij) / Z_g(i)  *  exp(s_{i, l_g}) / Z(i)        for j in block g < c,
    a_ij = exp(s_ij) / Z(i)                                       for j <= i in block c,

with ``s = q.k * scale``, ``l_g`` the landmark of block ``g``, ``Z_g(i)`` the sum of ``exp(s_ij)`` over
the regular tokens of block ``g``, and ``Z(i)`` the sum over the earlier landmarks and the current
block's tokens ``j <= i``. Landmarks mix in no value: a landmark's weight goes to its block. That is a
softmax over the regular keys with the bias ``s_{i, l_g} - log Z_g(i)`` on the keys of block ``g < c``
(0 in the current block), so here it runs as one ``multihead.attention`` call with that bias as a
``BlockBias`` score and the landmarks masked (``NoLandmarkKeys``): any backend, forward and backward.

Retrieval (``top_k``): each query keeps only the ``top_k`` earlier blocks with the highest landmark
scores ``s_{i, l_g}`` (a choice without gradient) and the same grouped softmax over them and its
current block; the pattern is a ``BlockSelection``, so the block-sparse backend computes only the
chosen blocks (the bias needs the chosen blocks' keys only). With ``top_k`` at least the number of
earlier blocks it equals the training form.

Backend: the bias depends on q and k, which the block-sparse backend differentiates by plain
autograd over its tiles (5-10x slower than SDPA at 1024 tokens on CPU), so ``backend="auto"`` runs
SDPA with the bias as a dense float mask up to ``DENSE_LIMIT`` logits and the usual choice beyond;
name a backend to force it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ShapeError
from ..functional import attention
from ..patterns import BlockLocal, Causal
from ..patterns.blocks import BlockSelection, NoLandmarkKeys
from ..scores.blocks import BlockBias
from .attention import MultiHeadAttention, attend, check_inputs


def _check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise ShapeError(f"block must be an integer >= 2 (block - 1 tokens and their landmark), got {block!r}")
    return block


def _check_top_k(top_k):
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ShapeError(f"top_k must be None (training form: every earlier block) or a positive integer, "
                         f"got {top_k!r}")
    return top_k


def landmark_positions(length: int, block: int, device=None) -> Tensor:
    """Bool ``(length,)``: True at the landmarks (the last token of every complete block)."""
    _check_block(block)
    return torch.arange(length, device=device) % block == block - 1


def insert_landmarks(x: Tensor, block: int, landmark: Tensor) -> Tensor:
    """``x`` ``(batch, tokens, dim)`` with ``landmark`` ``(dim,)`` inserted after every ``block - 1``
    tokens: ``(batch, tokens + tokens // (block - 1), dim)``; landmarks at ``landmark_positions``."""
    _check_block(block)
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ShapeError(f"x must be (batch, tokens, dim), got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(landmark, Tensor) or landmark.shape != x.shape[-1:]:
        raise ShapeError(f"landmark must be a ({x.shape[-1]},) tensor, got {getattr(landmark, 'shape', landmark)}")
    batch, tokens, dim = x.shape
    full = tokens // (block - 1)
    head = x[:, : full * (block - 1)].reshape(batch, full, block - 1, dim)
    marks = landmark.to(x.dtype).expand(batch, full, 1, dim)
    return torch.cat([torch.cat([head, marks], 2).reshape(batch, full * block, dim), x[:, full * (block - 1):]], 1)


def remove_landmarks(y: Tensor, block: int) -> Tensor:
    """The tokens of ``y`` ``(batch, tokens, ...)`` that are not landmarks (undoes ``insert_landmarks``)."""
    return y[:, ~landmark_positions(y.shape[1], block, y.device)]


def landmark_request(q: Tensor, k: Tensor, block: int, *, top_k: int | None = None,
                     scale: float | None = None):
    """The ``(pattern, score)`` with which ``multihead.attention`` computes Landmark Attention for these
    ``q`` ``(B, H, Lq, D)`` and ``k`` ``(B, Hkv, Lk, D)`` (queries aligned with the last keys)."""
    block, top_k = _check_block(block), _check_top_k(top_k)
    if not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.dim() != 4 or k.dim() != 4:
        raise ShapeError("q and k must be (batch, heads, tokens, head_dim) tensors")
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != dim or heads % kv_heads:
        raise ShapeError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (batch, head_dim, heads "
                         f"a multiple of kv heads)")
    if q_len > kv_len:
        raise ShapeError(f"Landmark Attention is causal: q_len ({q_len}) must not exceed kv_len ({kv_len})")
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    offset = kv_len - q_len
    keys = k.repeat_interleave(heads // kv_heads, 1) if kv_heads != heads else k
    full = kv_len // block  # blocks that end with a landmark
    blocks = -(-kv_len // block)
    current = (torch.arange(q_len, device=q.device) + offset) // block
    earlier = torch.arange(full, device=q.device) < current[:, None]  # (Lq, full)
    marks = keys[:, :, block - 1: full * block: block]  # (B, H, full, D)
    land = torch.matmul(q, marks.transpose(-2, -1)) * scale  # s_{i, l_g}
    regular = keys[:, :, : full * block].reshape(batch, heads, full, block, dim)[:, :, :, : block - 1]
    table = q.new_zeros(batch, heads, q_len, blocks)
    local = Causal() & NoLandmarkKeys(block)
    if top_k is None:
        # log Z_g(i) over the regular keys of every complete block
        logits = torch.matmul(q, regular.reshape(batch, heads, -1, dim).transpose(-2, -1)) * scale
        lse = logits.view(batch, heads, q_len, full, block - 1).logsumexp(-1)
        table = torch.cat([torch.where(earlier, land - lse, torch.zeros_like(land)), table[..., full:]], -1)
        return local, BlockBias(table, block, offset)
    keep = min(top_k, full)
    if keep == 0:
        return local & BlockLocal(block), BlockBias(table, block, offset)
    with torch.no_grad():
        top = land.masked_fill(~earlier, float("-inf")).topk(keep, dim=-1)
    chosen, valid = top.indices, top.values > float("-inf")
    if keep * dim < full:
        # keys of the chosen blocks only: (B, H, Lq, keep, block - 1, D), cheaper for long contexts
        b = torch.arange(batch, device=q.device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=q.device).view(1, -1, 1, 1)
        picked = regular[b, h, chosen]
        lse = torch.matmul(picked.flatten(3, 4), q.unsqueeze(-1)).squeeze(-1).mul(scale)
        lse = lse.view(batch, heads, q_len, keep, block - 1).logsumexp(-1)
    else:  # every block's log-sum-exp from one product, then the chosen ones
        logits = torch.matmul(q, regular.reshape(batch, heads, -1, dim).transpose(-2, -1)) * scale
        lse = logits.view(batch, heads, q_len, full, block - 1).logsumexp(-1).gather(-1, chosen)
    bias = torch.where(valid, land.gather(-1, chosen) - lse, torch.zeros_like(lse))
    table = table.scatter(-1, chosen, bias)
    pattern = (local & BlockLocal(block)) | BlockSelection(chosen, valid, block, kv_len, size=block - 1)
    return pattern, BlockBias(table, block, offset)


#: Up to this many logits (batch x heads x queries x keys), ``backend="auto"`` runs Landmark Attention
#: on SDPA with the bias as a dense float mask: the block-sparse backend differentiates a bias that
#: depends on q and k by plain autograd over its tiles, 5-10x slower than SDPA at 1024 tokens (CPU).
DENSE_LIMIT = 1 << 25


def choose_backend(backend: str, q: Tensor, k: Tensor, weights: bool = False) -> str:
    """``backend``, or for ``"auto"`` without weights: ``"sdpa"`` up to ``DENSE_LIMIT`` logits,
    ``"auto"`` beyond."""
    if backend != "auto" or weights:
        return backend
    return "sdpa" if q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= DENSE_LIMIT else "auto"


def landmark_attention(q: Tensor, k: Tensor, v: Tensor, block: int, *, top_k: int | None = None,
                       scale: float | None = None, dropout: float = 0.0, backend: str = "auto",
                       return_weights: bool = False):
    """Landmark Attention on ``(batch, heads, tokens, head_dim)`` tensors whose tokens at
    ``landmark_positions(kv_len, block)`` are landmarks (see the module docstring): the training form,
    or with ``top_k`` the retrieval form. Returns what ``multihead.attention`` returns; landmark
    keys get weight 0."""
    pattern, score = landmark_request(q, k, block, top_k=top_k, scale=scale)
    return attention(q, k, v, pattern=pattern, score=score, scale=scale, dropout=dropout,
                     backend=choose_backend(backend, q, k, return_weights),
                     return_weights=return_weights)


class LandmarkAttention(MultiHeadAttention):
    """Landmark Attention as a self-attention module on sequences that carry their landmarks (every
    ``block``-th token, ``insert_landmarks``); causal by construction.

    Against standard causal attention, earlier blocks are reached through their landmark: a block's
    tokens share the weight its landmark gets in a softmax with the current block's tokens, split by
    a softmax inside the block (module docstring). ``top_k`` switches to retrieval: each query reads
    only its ``top_k`` best blocks by landmark score plus its own block (for inference on long inputs;
    train with ``top_k=None``). Takes the topology options of ``MultiHeadAttention`` (``kv_heads``,
    ``head_dim``, ``position``, ``bias``, ``dropout``, ``backend``), not ``pattern``, ``score`` or
    ``normalizer``.
    """

    causal = True

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, block: int,
                 top_k: int | None = None, **options):
        for name in ("pattern", "score", "normalizer", "kv_dim", "context_parallel"):
            if options.get(name) is not None:
                raise ShapeError(f"LandmarkAttention sets its own {name}; drop {name}=")
        super().__init__(dim, heads, kv_heads, **options)
        self.block, self.top_k = _check_block(block), _check_top_k(top_k)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False):
        if context is not None or key_padding_mask is not None:
            raise ShapeError("LandmarkAttention is causal self-attention: pass no context or key_padding_mask")
        check_inputs(x, None, self.dim)
        q, k, v = self.project(x, x)
        pattern, score = landmark_request(q, k, self.block, top_k=self.top_k)
        chosen = self.backend
        self.backend = choose_backend(chosen, q, k, need_weights)
        try:
            out, weights = attend(self, q, k, v, need_weights=need_weights, pattern=pattern, score=score)
        finally:
            self.backend = chosen
        y = self.combine(out, x)
        return (y, weights) if need_weights else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block={self.block}, top_k={self.top_k}"
