"""Attention modules the benchmark measures beside the catalog's token mixers: heads that read out,
point or cross two streams (probe, pointer, TNT, DCAL, kMaX, PEM) or work on a map's channels
(DANet), which are not ``(batch, N, dim) -> (batch, N, dim)`` variants. Each is
wrapped to take the benchmark's input ``x`` ``(batch, N, dim)``; what the wrapper derives from ``x``
(the second stream, the scores, the centres) is said in its summary. Their outputs have their own
shapes; the benchmark back-propagates a random gradient of that shape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn.dcal import GlobalLocalCrossAttention, PairWiseCrossAttention
from ..nn.kmeans_cross import KMeansCrossAttention
from ..nn.pointer import PointerAttention
from ..nn.probe import AttentiveProbe
from ..nn.prototype_cross import PrototypeCrossAttention
from ..vision.dual_attention import ChannelAttention, PositionAttention
from ..vision.tnt import TNTBlock


@dataclass(frozen=True)
class Readout:
    name: str
    family: str
    summary: str
    build: Callable[[int, int, int], nn.Module]


class Pointing(nn.Module):
    """Every position points over the inputs: ``PointerAttention(x, x)`` ``(batch, N, N)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pointer = PointerAttention(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointer(x, x)


class WordsAndSentences(nn.Module):
    """A TNT block: ``x`` cut into patches of ``words`` tokens (the words, ``(batch, N / words, words,
    dim)``), the sentences their means after a learned class token; returns both streams concatenated
    along the tokens."""

    def __init__(self, dim: int, heads: int, words: int = 4):
        super().__init__()
        self.words = words
        self.block = TNTBlock(dim, dim, words, inner_heads=heads, outer_heads=heads)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        words = x[:, : tokens - tokens % self.words].reshape(batch, -1, self.words, dim)
        sentences = torch.cat([self.cls.expand(batch, 1, dim).to(x.dtype), words.mean(2)], 1)
        y, z = self.block(words, sentences)
        return torch.cat([y.flatten(1, 2), z], 1)


class TopTokensQueryAll(nn.Module):
    """DCAL's GLCA: the 10% of tokens with the largest norm (standing in for the rollout score) query
    every token."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.glca = GlobalLocalCrossAttention(dim, heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.glca(x, x.norm(dim=-1), max(1, x.shape[1] // 10))[0]


class WithDistractor(nn.Module):
    """DCAL's PWCA: ``x`` over its own keys and those of the next image of the batch (itself at batch 1)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.pwca = PairWiseCrossAttention(dim, heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.pwca(x, x.roll(1, 0))


class ClusterCentres(nn.Module):
    """kMaX: ``clusters`` learned centres updated from the tokens as pixels."""

    def __init__(self, dim: int, heads: int, clusters: int = 16):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(clusters, dim) * dim ** -0.5)
        self.update = KMeansCrossAttention(dim, heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.update(self.centres.to(x.dtype).expand(x.shape[0], -1, -1), x)


class Prototypes(nn.Module):
    """PEM: ``queries`` learned object queries, each taking one prototype pixel per head from the tokens
    laid out on their square grid."""

    def __init__(self, dim: int, heads: int, seq_len: int, queries: int = 16):
        super().__init__()
        from ..catalog import square_grid

        self.grid = square_grid(seq_len)
        self.queries = nn.Parameter(torch.randn(queries, dim) * dim ** -0.5)
        self.pem = PrototypeCrossAttention(dim, heads)

    def forward(self, x: Tensor) -> Tensor:
        features = x.view(x.shape[0], *self.grid, x.shape[-1])
        return self.pem(self.queries.to(x.dtype).expand(x.shape[0], -1, -1), features)


class OnSquareGrid(nn.Module):
    """A channels-last map block on the tokens laid out on their square grid (DANet's position and
    channel attention, whose gamma starts at 0: set to 1 here so the attention is not skipped)."""

    def __init__(self, block: nn.Module, seq_len: int):
        super().__init__()
        from ..catalog import square_grid

        self.block, self.grid = block, square_grid(seq_len)
        with torch.no_grad():
            block.gamma.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x.view(x.shape[0], *self.grid, x.shape[-1])).flatten(1, 2)


READOUTS: dict[str, Readout] = {r.name: r for r in (
    Readout("attentive_probe", "readout", "Efficient Probing: 4 learned queries over the tokens, pooled, classified",
            lambda dim, heads, n: AttentiveProbe(dim, 10, heads=heads, queries=4)),
    Readout("pointer", "readout", "Pointer Network head: each position's additive scores over the inputs "
            "(hidden 32), a distribution", lambda dim, heads, n: Pointing(dim, 32)),
    Readout("tnt", "cross", "TNT block: inner attention over 4-token patches, folded into the sentences, outer "
            "attention", lambda dim, heads, n: WordsAndSentences(dim, heads)),
    Readout("dcal_glca", "cross", "DCAL global-local cross-attention: the top 10% tokens query all",
            lambda dim, heads, n: TopTokensQueryAll(dim, heads)),
    Readout("dcal_pwca", "cross", "DCAL pair-wise cross-attention: keys and values of two images",
            lambda dim, heads, n: WithDistractor(dim, heads)),
    Readout("kmax", "cross", "kMaX k-means cross-attention: 16 centres, each pixel to its best centre",
            lambda dim, heads, n: ClusterCentres(dim, heads)),
    Readout("danet_position", "vision", "DANet position attention: one unscaled head, dim/8 queries and keys "
            "(square grid)", lambda dim, heads, n: OnSquareGrid(PositionAttention(dim), n)),
    Readout("danet_channel", "vision", "DANet channel attention: the channels as tokens, softmax(-X X^T) "
            "(square grid)", lambda dim, heads, n: OnSquareGrid(ChannelAttention(dim), n)),
    Readout("pem", "cross", "PEM prototype cross-attention: 16 queries, each one pixel per head (square grid)",
            lambda dim, heads, n: Prototypes(dim, heads, n)),
)}
