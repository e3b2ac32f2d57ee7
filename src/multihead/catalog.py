"""Every variant multihead implements: family, constructor and the paper it follows.

``build(dim, heads, seq_len)`` returns an ``nn.Module`` mapping ``(batch, seq_len, dim)`` to the same
shape, so the benchmark and the arena can run any variant the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .nn import MultiHeadAttention
from .patterns import Causal, Documents, PrefixLM, SlidingWindow
from .scores import ALiBi, RelativePositionBias, RoPE, Softcap


@dataclass(frozen=True)
class Paper:
    title: str
    year: int
    arxiv: str | None = None

    def cite(self) -> str:
        return f"{self.title} ({self.year}" + (f", arXiv {self.arxiv})" if self.arxiv else ")")


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    summary: str
    paper: Paper
    build: Callable[[int, int, int], nn.Module]


VASWANI = Paper("Attention Is All You Need", 2017, "1706.03762")
T5 = Paper("Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer", 2019,
           "1910.10683")


def default_window(seq_len: int) -> int:
    """The benchmark's local window: 128 keys each side, smaller for short sequences."""
    return max(1, min(128, seq_len // 4))


def equal_documents(seq_len: int, count: int = 4) -> Documents:
    """``count`` packed documents of (nearly) equal length."""
    bounds = torch.linspace(0, seq_len, count + 1).round().long().unique()
    return Documents(bounds)


def _mha(**options) -> Callable[[int, int, int], nn.Module]:
    """A builder of ``MultiHeadAttention``; options may be callables of (heads, head_dim, seq_len)."""

    def build(dim: int, heads: int, seq_len: int) -> nn.Module:
        head_dim = dim // heads
        resolved = {k: (v(heads, head_dim, seq_len) if callable(v) else v) for k, v in options.items()}
        return MultiHeadAttention(dim, heads, **resolved)

    return build


_VARIANTS = [
    Variant("mha", "topology", "standard multi-head attention: every head has its own q, k, v",
            VASWANI, _mha()),
    Variant("gqa", "topology", "grouped-query: groups of query heads share one key/value head",
            Paper("GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints",
                  2023, "2305.13245"),
            _mha(kv_heads=lambda h, d, n: max(1, h // 4))),
    Variant("mqa", "topology", "multi-query: all query heads share a single key/value head",
            Paper("Fast Transformer Decoding: One Write-Head is All You Need", 2019, "1911.02150"),
            _mha(kv_heads=1)),
    Variant("causal", "pattern", "each token sees itself and earlier tokens", VASWANI,
            _mha(pattern=Causal())),
    Variant("sliding_window", "pattern", "each token sees keys within a fixed distance on each side",
            Paper("Longformer: The Long-Document Transformer", 2020, "2004.05150"),
            _mha(pattern=lambda h, d, n: SlidingWindow(default_window(n), default_window(n)))),
    Variant("prefix_lm", "pattern", "a bidirectional prefix, then causal", T5,
            _mha(pattern=lambda h, d, n: PrefixLM(max(1, n // 4)))),
    Variant("documents", "pattern", "packed sequences: tokens see only their own document (causal)",
            Paper("Efficient Sequence Packing without Cross-contamination: Accelerating Large Language "
                  "Models without Impacting Performance", 2021, "2107.02027"),
            _mha(pattern=lambda h, d, n: equal_documents(n) & Causal())),
    Variant("alibi", "score", "per-head linear distance penalty on the logits, no position embedding",
            Paper("Train Short, Test Long: Attention with Linear Biases Enables Input Length "
                  "Extrapolation", 2021, "2108.12409"),
            _mha(pattern=Causal(), score=lambda h, d, n: ALiBi(h))),
    Variant("softcap", "score", "logits squashed by cap * tanh(logit / cap)",
            Paper("Gemma 2: Improving Open Language Models at a Practical Size", 2024, "2408.00118"),
            _mha(pattern=Causal(), score=lambda h, d, n: Softcap(50.0))),
    Variant("t5_relative_bias", "score", "learned per-head bias on log-bucketed relative distance", T5,
            _mha(score=lambda h, d, n: RelativePositionBias(h))),
    Variant("rope", "position", "q and k rotated by position so q.k depends on relative offset",
            Paper("RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021, "2104.09864"),
            _mha(pattern=Causal(), position=lambda h, d, n: RoPE(d))),
]

CATALOG: dict[str, Variant] = {v.name: v for v in _VARIANTS}


def get(name: str) -> Variant:
    """The variant called ``name``; a ``KeyError`` lists the known names."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(CATALOG)}") from None


def markdown_table() -> str:
    """The catalog as a Markdown table (the README's variant table is this, generated)."""
    rows = ["| variant | family | what it changes | paper |", "|---|---|---|---|"]
    for v in CATALOG.values():
        link = f"[arXiv {v.paper.arxiv}](https://arxiv.org/abs/{v.paper.arxiv})" if v.paper.arxiv else ""
        rows.append(f"| `{v.name}` | {v.family} | {v.summary} | {v.paper.title} ({v.paper.year}) {link} |")
    return "\n".join(rows)
