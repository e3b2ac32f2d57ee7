"""SeerAttention (Gao et al., 2024, "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs",
arXiv 2410.13276): a learnable gate picks the blocks of the attention map worth computing.

Against standard attention, the pairs a query may see are not fixed: the sequence is cut into
blocks of ``block`` tokens, and a small gate (``SeerGate``) scores every (query block, key block)
pair from pooled queries and keys - queries average-pooled, keys max-, min- and average-pooled and
concatenated, each through a learned per-head projection, then a softmax over the key blocks (its
own small attention, run by ``multihead.attention`` on the pooled tokens). Each query block keeps
its ``top_k`` best key blocks (its diagonal block always) and attention runs on those blocks only:
a ``BlockSelection`` pattern, which the block-sparse backend computes tile by tile.

The gate is trained by self-distillation with the attention itself frozen (the paper's
post-training): its target is the full attention map max-pooled over blocks and renormalised per
row (``seer_target``; the paper extracts it with a FlashAttention variant, here the dense reference
returns the map), the loss a KL divergence (``seer_loss``). The choice of blocks carries no
gradient, so the gate learns only from that loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..nn.attention import MultiHeadAttention, attend, check_inputs
from ..patterns import Causal
from ..patterns.blocks import BlockSelection


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_qk(q: Tensor, k: Tensor) -> None:
    if not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.dim() != 4 or k.dim() != 4:
        raise ShapeError("q and k must be (batch, heads, tokens, head_dim) tensors")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ShapeError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (batch, head_dim, heads a "
                         f"multiple of kv heads)")
    if q.shape[2] != k.shape[2]:
        raise ShapeError(f"SeerAttention gates self-attention: q_len ({q.shape[2]}) must equal kv_len ({k.shape[2]})")


def block_pool(x: Tensor, block: int, how: str) -> Tensor:
    """``x`` ``(B, H, N, D)`` pooled over consecutive blocks of ``block`` tokens (the last one may be
    shorter): ``"avg"``, ``"max"`` or ``"min"`` -> ``(B, H, ceil(N / block), D)``."""
    batch, heads, length, dim = x.shape
    blocks = -(-length // block)
    pad = blocks * block - length
    fill = {"avg": 0.0, "max": float("-inf"), "min": float("inf")}[how]
    padded = F.pad(x, (0, 0, 0, pad), value=fill).view(batch, heads, blocks, block, dim)
    if how == "avg":
        counts = torch.full((blocks,), float(block), dtype=x.dtype, device=x.device)
        counts[-1] = block - pad
        return padded.sum(3) / counts.view(1, 1, -1, 1)
    return padded.amax(3) if how == "max" else padded.amin(3)


class SeerGate(nn.Module):
    """SeerAttention's AttnGate: block-level attention scores ``(B, H, blocks, blocks)`` from
    average-pooled queries and max/min/average-pooled keys, each projected per head to ``gate_dim``,
    softmax over the key blocks (causal at block level when ``causal``)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, block: int, gate_dim: int | None = None,
                 causal: bool = True):
        super().__init__()
        self.heads, self.kv_heads = _positive_int("heads", heads), _positive_int("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ShapeError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
        self.head_dim, self.block = _positive_int("head_dim", head_dim), _positive_int("block", block)
        self.gate_dim = _positive_int("gate_dim", head_dim if gate_dim is None else gate_dim)
        self.causal = bool(causal)
        self.q_weight = nn.Parameter(torch.randn(heads, head_dim, self.gate_dim) / math.sqrt(head_dim))
        self.k_weight = nn.Parameter(torch.randn(kv_heads, 3 * head_dim, self.gate_dim) / math.sqrt(3 * head_dim))

    def pooled(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """The gate's block queries ``(B, H, blocks, gate_dim)`` and keys ``(B, Hkv, blocks, gate_dim)``."""
        _check_qk(q, k)
        if q.shape[1] != self.heads or k.shape[1] != self.kv_heads or q.shape[3] != self.head_dim:
            raise ShapeError(f"SeerGate was built for {self.heads} heads, {self.kv_heads} kv heads, head_dim "
                             f"{self.head_dim}; got q {tuple(q.shape)}, k {tuple(k.shape)}")
        pq = block_pool(q, self.block, "avg")
        pk = torch.cat([block_pool(k, self.block, how) for how in ("max", "min", "avg")], -1)
        return (torch.einsum("bhnd,hde->bhne", pq, self.q_weight.to(q.dtype)),
                torch.einsum("bhnd,hde->bhne", pk, self.k_weight.to(k.dtype)))

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        gq, gk = self.pooled(q, k)
        dummy = gk.new_zeros(*gk.shape[:3], 1)
        _, scores = attention(gq, gk, dummy, pattern=Causal() if self.causal else None, backend="reference",
                              return_weights=True)
        return scores

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, block={self.block}, "
                f"gate_dim={self.gate_dim}, causal={self.causal}")


def seer_target(q: Tensor, k: Tensor, block: int, *, causal: bool = True, scale: float | None = None) -> Tensor:
    """The gate's distillation target: the full attention map ``softmax(q k^T * scale)`` (causal when
    ``causal``) max-pooled over ``block x block`` tiles, each row renormalised to sum to 1:
    ``(B, H, blocks, blocks)``, without gradient."""
    _check_qk(q, k)
    block = _positive_int("block", block)
    with torch.no_grad():
        dummy = k.new_zeros(*k.shape[:3], 1)
        _, weights = attention(q, k, dummy, pattern=Causal() if causal else None, scale=scale,
                               backend="reference", return_weights=True)
        length = q.shape[2]
        blocks = -(-length // block)
        pad = blocks * block - length
        pooled = F.max_pool2d(F.pad(weights, (0, pad, 0, pad)).flatten(0, 1), block).unflatten(0, weights.shape[:2])
        return pooled / pooled.sum(-1, keepdim=True)


def seer_loss(scores: Tensor, target: Tensor) -> Tensor:
    """KL(target || scores) over the key blocks, averaged over batch, heads and query blocks (pairs
    the target gives no weight add nothing)."""
    if scores.shape != target.shape:
        raise ShapeError(f"scores {tuple(scores.shape)} and target {tuple(target.shape)} must have one shape")
    kept = target > 0
    terms = torch.where(kept, target * (target.clamp_min(1e-30).log() - scores.clamp_min(1e-30).log()),
                        torch.zeros_like(target))
    return terms.sum(-1).mean()


def select_blocks(scores: Tensor, top_k: int, block: int, length: int, *, causal: bool = True) -> BlockSelection:
    """The pattern of the ``top_k`` best key blocks of each query block by gate ``scores``
    ``(B, H, blocks, blocks)`` - the diagonal block always among them, future blocks never (when
    ``causal``) - given to every query row of the block: a ``BlockSelection`` over ``length`` tokens."""
    top_k = _positive_int("top_k", top_k)
    blocks = scores.shape[-1]
    if scores.shape[-2] != blocks or blocks != -(-length // block):
        raise ShapeError(f"scores {tuple(scores.shape)} do not cover {length} tokens in blocks of {block}")
    keep = min(top_k, blocks)
    with torch.no_grad():
        ranked = scores.detach().clone().float()
        rows = torch.arange(blocks, device=scores.device)
        if causal:
            ranked = ranked.masked_fill(rows[None, :] > rows[:, None], float("-inf"))
        ranked[..., rows, rows] = float("inf")
        top = ranked.topk(keep, dim=-1)
        chosen, valid = top.indices, top.values > float("-inf")
        row_block = torch.arange(length, device=scores.device) // block
    return BlockSelection(chosen[:, :, row_block], valid[:, :, row_block], block, length)


class SeerAttention(MultiHeadAttention):
    """Attention on the blocks a learned gate picks (SeerAttention; module docstring).

    ``forward`` runs attention on the ``top_k`` key blocks per query block that ``self.gate`` scores
    highest (plus the diagonal block), intersected with ``Causal()`` when ``causal`` (block-causal:
    a query's block choice reads the whole of its own block, see ``pattern_restricts_mixing``);
    ``gate_loss(x)`` is the gate's distillation loss against the block max-pool of the full
    attention map of the same projections (train the gate with the rest frozen, as the paper does).
    Takes the topology options of ``MultiHeadAttention`` except ``pattern``, ``score`` and
    ``normalizer``.
    """

    #: The gate makes the pattern, and it reads whole blocks: with ``causal`` a query's output does
    #: not depend on later blocks, but the choice of blocks for a query depends on the later tokens of
    #: its own block (the paper gates a whole prompt at once), so the module is block-causal, not
    #: token-causal, and ``multihead.models.make_causal`` refuses it rather than claim otherwise.
    pattern_restricts_mixing = False

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, block: int = 64, top_k: int = 4,
                 gate_dim: int | None = None, causal: bool = True, **options):
        for name in ("pattern", "score", "normalizer", "kv_dim", "context_parallel"):
            if options.get(name) is not None:
                raise ShapeError(f"SeerAttention sets its own {name}; drop {name}=")
        super().__init__(dim, heads, kv_heads, **options)
        self.block, self.top_k = _positive_int("block", block), _positive_int("top_k", top_k)
        self.block_causal = bool(causal)
        self.gate = SeerGate(self.heads, self.kv_heads, self.head_dim, block, gate_dim, causal)

    def freeze_gate(self) -> "SeerAttention":
        """Stop the gate's parameters from training (the output gives them no gradient: the gate
        learns from ``gate_loss`` only); returns the module."""
        for p in self.gate.parameters():
            p.requires_grad_(False)
        return self

    def selection(self, q: Tensor, k: Tensor) -> BlockSelection:
        """The blocks this call attends (from the gate's scores, no gradient)."""
        with torch.no_grad():
            scores = self.gate(q.detach(), k.detach())
        return select_blocks(scores, self.top_k, self.block, q.shape[2], causal=self.block_causal)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False):
        if context is not None:
            raise ShapeError("SeerAttention gates self-attention: pass no context")
        check_inputs(x, None, self.dim)
        q, k, v = self.project(x, x)
        pattern = self.selection(q, k)
        pattern = Causal() & pattern if self.block_causal else pattern
        out, weights = attend(self, q, k, v, key_padding_mask=key_padding_mask, need_weights=need_weights,
                              pattern=pattern)
        y = self.combine(out, x)
        return (y, weights) if need_weights else y

    def gate_loss(self, x: Tensor) -> Tensor:
        """KL divergence of the gate's block scores from the block max-pool of the full attention map
        (the projections are not trained by it: q and k are detached)."""
        check_inputs(x, None, self.dim)
        q, k, _ = self.project(x, x)
        q, k = q.detach(), k.detach()
        return seer_loss(self.gate(q, k), seer_target(q, k, self.block, causal=self.block_causal))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block={self.block}, top_k={self.top_k}, causal={self.block_causal}"


__all__ = ["SeerGate", "SeerAttention", "block_pool", "seer_target", "seer_loss", "select_blocks"]
