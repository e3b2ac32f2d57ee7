"""Grouped-query and multi-query attention as topologies, with the conversion from multi-head
checkpoints by mean-pooling the key and value heads of each group (Ainslie et al., 2023)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ShapeError
from ..nn import MultiHeadAttention
from .base import Topology


def constructor_options(module: MultiHeadAttention) -> dict:
    """The keyword arguments that rebuild ``module``'s configuration (weights aside)."""
    return dict(head_dim=module.head_dim, pattern=module.pattern, score=module.score,
                position=module.position, bias=module.q_proj.bias is not None, dropout=module.dropout,
                backend=module.backend, kv_dim=module.kv_dim)


def copy_projections(source: MultiHeadAttention, target: nn.Module, names=("q_proj", "k_proj", "v_proj",
                                                                            "out_proj")) -> None:
    """Copy the named ``nn.Linear`` projections of ``source`` into ``target`` (same shapes)."""
    with torch.no_grad():
        for name in names:
            src, dst = getattr(source, name), getattr(target, name)
            if src.weight.shape != dst.weight.shape:
                raise ShapeError(f"{name}: {tuple(src.weight.shape)} does not fit {tuple(dst.weight.shape)}")
            dst.weight.copy_(src.weight)
            if src.bias is not None:
                dst.bias.copy_(src.bias)


class GroupedQueryAttention(Topology):
    """Grouped-query attention (Ainslie et al., 2023): ``kv_heads`` key/value heads, each shared by
    ``heads // kv_heads`` query heads.

    Against standard multi-head attention it changes only the key/value projections: fewer heads,
    so the KV cache shrinks by ``heads / kv_heads`` while the attention FLOPs stay the same. It is
    ``MultiHeadAttention`` (whose constructor it takes) with the cost methods of a topology, and
    ``from_mha`` builds it from a multi-head checkpoint as the paper does (uptraining starts there).
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, **options):
        super().__init__(dim, heads, kv_heads=max(1, heads // 4) if kv_heads is None else kv_heads,
                         **options)

    @classmethod
    def from_mha(cls, module: MultiHeadAttention, kv_heads: int | None = None, **overrides):
        """Mean-pool the key and value projection heads of each group of ``module`` (the paper's
        conversion; it found mean-pooling better than keeping one head or random init). Query and
        output projections are copied. ``module`` may itself be grouped; ``kv_heads`` must divide
        its key/value heads."""
        if not isinstance(module, MultiHeadAttention):
            raise ShapeError(f"from_mha takes a MultiHeadAttention, got {type(module).__name__}")
        kv_heads = cls._default_kv_heads(module) if kv_heads is None else kv_heads
        if module.kv_heads % kv_heads:
            raise ShapeError(f"kv_heads ({kv_heads}) must divide the module's key/value heads ({module.kv_heads})")
        options = {**constructor_options(module), **overrides}
        new = cls(module.dim, module.heads, kv_heads=kv_heads, **options).to(module.q_proj.weight)
        copy_projections(module, new, ("q_proj", "out_proj"))
        group = module.kv_heads // kv_heads
        with torch.no_grad():
            for name in ("k_proj", "v_proj"):
                src, dst = getattr(module, name), getattr(new, name)
                weight = src.weight.view(kv_heads, group, module.head_dim, -1).mean(1)
                dst.weight.copy_(weight.reshape_as(dst.weight))
                if src.bias is not None:
                    dst.bias.copy_(src.bias.view(kv_heads, group, module.head_dim).mean(1).reshape(-1))
        return new

    @staticmethod
    def _default_kv_heads(module) -> int:
        return max(1, module.kv_heads // 4)


class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query attention (Shazeer, 2019): one key/value head shared by every query head; the
    KV cache shrinks by ``heads``. Grouped-query attention with ``kv_heads=1``."""

    def __init__(self, dim: int, heads: int, **options):
        options.pop("kv_heads", None)
        super().__init__(dim, heads, kv_heads=1, **options)

    @staticmethod
    def _default_kv_heads(module) -> int:
        return 1
