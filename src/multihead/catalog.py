"""Every variant multihead implements: family, constructor and the paper it follows.

``build(dim, heads, seq_len)`` returns an ``nn.Module`` mapping ``(batch, seq_len, dim)`` to the same
shape, so the benchmark and the arena can run any variant the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import math

import torch
from torch import nn

from .heads import (CompressedAttention, LowRankAttention, MixtureOfHeads, MultiHeadLatentAttention,
                    SingleHeadAttention, SparseQueryAttention, TalkingHeadsAttention)
from .linear import Aaren, LightningAttention, LinearAttention, ManhattanSelfAttention, Retention
from .nn import GatedPositionalAttention, MultiHeadAttention, RCMHA, RelativeAttention, SinkAttention
from .heads.seer import SeerAttention
from .heads.selective import SelectiveMultiHeadAttention
from .heads.tpla import TensorParallelLatentAttention
from .nn.landmark import LandmarkAttention
from .nn.long_short_query import LongShortQueryAttention
from .nn.soft_causal import SoftCausalAttention
from .nn.head_token import HeadTokenAttention
from .nn.p_adapter import PLaplacianAttention
from .nn.titans import TitansGatedAttention
from .nn.combiner import CombinerAttention
from .nn.dynamic_mask import DynamicMaskAttention
from .nn.fit import FITBlock
from .nn.forward_cross import FcaStage
from .nn.group_pose import GroupPoseAttention
from .nn.mesa import MesaAttention
from .nn.minimal import MinimalAttention
from .nn.recycled import RecycledAttention
from .nn.sorted_groups import FlattenedWindowAttention, HistogramAttention
from .nn.sparsifiner import Sparsifiner
from .nn.two_pass import LongRangeGroupingAttention, SharedAxisAttention
from .normalizers import GaussianAdaptive
from .patterns import (BlockLocal, Causal, CrossShapedWindow, Dilated, Documents, GlobalTokens, Halo,
                       Neighborhood, PerHead, PrefixLM, Routing, ShiftedWindow, SlidingWindow, TopK,
                       Axial)
from .models.recursive import SlicedRecursiveBlock
from .scores import ALiBi, ComplexRotation, RelativePositionBias, RoPE, Softcap
from .vision import (ChannelGroupAttention, CrossShapedWindowAttention, HaloAttention, LocalGlobalAttention,
                     MultiScaleHeadAttention, NeighborhoodAttention2d, SparseGlobalAttention, WindowAttention)
from .vision.aggregated import AggregatedAttention
from .vision.builders import TwoBranchBuild, VisionBuild
from .vision.conv_projection import ConvProjectionAttention
from .vision.slots import SlotAttention2d


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


def _alternate(even, odd):
    """A vision ``make(dim, heads, grid, layer)`` using ``even`` on even layers, ``odd`` on odd ones."""
    return lambda dim, heads, grid, layer: (odd if layer % 2 else even)(dim, heads, grid)


def multiscale_scales(heads: int) -> tuple[int, ...]:
    """Key/value pyramid scales 1, 2, 4, 8 - as many as divide the heads evenly."""
    count = next(c for c in (4, 2, 1) if heads % c == 0)
    return (1, 2, 4, 8)[:count]


def long_distance(dim: int, heads: int, grid, interval: int = 4) -> NeighborhoodAttention2d:
    """CrossFormer's long-distance attention: positions an interval apart on both axes form a group
    (a neighborhood covering its whole dilated sub-grid), with the DPB in units of the interval; the
    interval on an axis is the largest divisor of its size up to ``interval``."""
    interval = tuple(max(i for i in range(1, interval + 1) if n % i == 0) for n in grid)
    kernel = tuple(n // i for n, i in zip(grid, interval))
    return NeighborhoodAttention2d(dim, heads, kernel, interval, relative_bias="dynamic")


def _tpla(mla: MultiHeadLatentAttention, shards: int = 2) -> TensorParallelLatentAttention:
    """TPLA over ``mla`` in ``shards`` shards, Hadamard-rotated when the latent width is a power of two."""
    power_of_two = mla.kv_rank & (mla.kv_rank - 1) == 0
    return TensorParallelLatentAttention(mla, shards, transform="hadamard" if power_of_two else None,
                                         mla_prefill=False)


VASWANI = Paper("Attention Is All You Need", 2017, "1706.03762")
T5 = Paper("Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer", 2019,
           "1910.10683")


def _p_adapter(dim: int, heads: int) -> PLaplacianAttention:
    """The p-adapter on its self-attention graph, with the authors' reduction 8 where the adapter width
    then splits over the heads (else the largest of 4, 2, 1 that does)."""
    reduction = next(r for r in (8, 4, 2, 1) if dim % r == 0 and (dim // r) % heads == 0)
    return PLaplacianAttention(dim, heads, reduction=reduction)


def default_window(seq_len: int) -> int:
    """The benchmark's local window: 128 keys each side, smaller for short sequences."""
    return max(1, min(128, seq_len // 4))


def equal_documents(seq_len: int, count: int = 4) -> Documents:
    """``count`` packed documents of (nearly) equal length."""
    bounds = torch.linspace(0, seq_len, count + 1).round().long().unique()
    return Documents(bounds)


def landmark_block(seq_len: int) -> int:
    """Landmark Attention's block in the catalog: 64 tokens (63 and a landmark; the paper uses 50 + 1),
    smaller for short sequences (at least 4 blocks)."""
    return max(2, min(64, seq_len // 4))


def pose_groups(seq_len: int) -> tuple[int, int]:
    """Group Pose in the catalog: ``(instances, keypoints)`` with groups of up to 18 queries (COCO's 17
    keypoints + the instance query) that divide ``seq_len``."""
    group = max((g for g in range(2, 19) if seq_len % g == 0), default=None)
    if group is None:
        raise ValueError(f"Group Pose needs a query count with a divisor between 2 and 18, got {seq_len}")
    return seq_len // group, group - 1


def view_groups(seq_len: int, views: int = 4, groups: int = 8) -> tuple[int, int, int]:
    """LRGT in the catalog: ``(views, tokens per view, groups)``, the most views up to ``views`` and the
    most groups up to ``groups`` that divide the sequence and each view."""
    views = max(v for v in range(1, views + 1) if seq_len % v == 0)
    per_view = seq_len // views
    return views, per_view, max(g for g in range(1, groups + 1) if per_view % g == 0)


def square_grid(seq_len: int) -> tuple[int, int]:
    """The square grid of ``seq_len`` tokens that the 2-D variants use."""
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"2-D variants need a square number of tokens (e.g. 1024 = 32 x 32), got {seq_len}")
    return side, side


def packed_images(seq_len: int) -> Documents:
    """Three images of different shapes packed into ``seq_len`` (a square) tokens: a wide half, then
    two tiles below it (the layout NaViT's packing produces)."""
    side = square_grid(seq_len)[0]
    top, bottom = side // 2, side - side // 2
    return Documents.from_grids([(top, side), (bottom, top), (bottom, bottom)])


def axial_rows_and_columns(heads: int, grid: tuple[int, int]) -> PerHead:
    """Half of the heads attend along rows, half along columns."""
    return PerHead([Axial(grid, axis=1)] * (heads - heads // 2) + [Axial(grid, axis=0)] * (heads // 2))


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
    Variant("moh", "topology",
            "mixture-of-heads: a per-token router keeps shared + top-k routed heads and weights their outputs",
            Paper("MoH: Multi-Head Attention as Mixture-of-Head Attention", 2024, "2410.11842"),
            lambda dim, heads, n: MixtureOfHeads(dim, heads)),
    Variant("sqa", "topology", "sparse-query: half the query heads (quarter kv heads), attention FLOPs halve",
            Paper("Sparse Query Attention (SQA): A Computationally Efficient Attention Mechanism with Query "
                  "Heads Reduction", 2025, "2510.01817"),
            lambda dim, heads, n: SparseQueryAttention(dim, heads)),
    Variant("mla", "topology",
            "latent: keys and values from one low-rank latent per token plus a shared rotary key (causal)",
            Paper("DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model", 2024,
                  "2405.04434"),
            lambda dim, heads, n: MultiHeadLatentAttention(dim, heads, pattern=Causal())),
    Variant("tpla", "topology",
            "MLA with its latent cut in 2 tensor-parallel shards (Hadamard-rotated): a softmax per shard, outputs "
            "summed (causal)",
            Paper("TPLA: Tensor Parallel Latent Attention for Efficient Disaggregated Prefill & Decode Inference",
                  2025, "2508.15881"),
            lambda dim, heads, n: _tpla(MultiHeadLatentAttention(dim, heads, pattern=Causal()))),
    Variant("smha", "topology",
            "every token routed to half the heads; each head attends only among its tokens, RoPE at their ranks "
            "(causal)",
            Paper("Union of Experts: Adapting Hierarchical Routing to Equivalently Decomposed Transformer", 2025,
                  "2503.02495"),
            lambda dim, heads, n: SelectiveMultiHeadAttention(dim, heads, pattern=Causal(),
                                                              position=RoPE(dim // heads))),
    Variant("cca", "topology",
            "compressed: q, k, v down-projected 4x, convolved, attention runs in the latent space (causal)",
            Paper("Compressed Convolutional Attention: Efficient Attention in a Compressed Latent Space", 2025,
                  "2510.04476"),
            lambda dim, heads, n: CompressedAttention(dim, heads, compression=4, pattern=Causal())),
    Variant("ccgqa", "topology", "compressed 2x with grouped latent key/value heads (half as many; causal)",
            Paper("Compressed Convolutional Attention: Efficient Attention in a Compressed Latent Space", 2025,
                  "2510.04476"),
            lambda dim, heads, n: CompressedAttention(dim, heads, max(1, heads // 2), compression=2,
                                                      pattern=Causal())),
    Variant("low_rank", "topology",
            "compact: low-rank bilinear heads queried by one learned context vector pool the tokens",
            Paper("Low Rank Factorization for Compact Multi-Head Self-Attention", 2019, "1912.00835"),
            lambda dim, heads, n: LowRankAttention(dim, heads, per_token=True)),
    Variant("single_head", "topology", "one head over a quarter of the channels, the rest passed through (SHViT)",
            Paper("SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design", 2024, "2401.16456"),
            lambda dim, heads, n: SingleHeadAttention(dim)),
    Variant("talking_heads", "topology", "logits and weights mixed across heads before and after the softmax",
            Paper("Talking-Heads Attention", 2020, "2003.02436"),
            lambda dim, heads, n: TalkingHeadsAttention(dim, heads)),
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
    Variant("dilated_window", "pattern", "a sliding window that skips keys: every d-th within w*d",
            Paper("Longformer: The Long-Document Transformer", 2020, "2004.05150"),
            _mha(pattern=lambda h, d, n: Dilated(max(1, default_window(n) // 2), 2))),
    Variant("global_local", "pattern", "a few global tokens see and are seen by all, the rest a window",
            Paper("Longformer: The Long-Document Transformer", 2020, "2004.05150"),
            _mha(pattern=lambda h, d, n: GlobalTokens(min(8, n // 4) or 1)
                 | SlidingWindow(default_window(n), default_window(n)))),
    Variant("block_local", "pattern", "tokens attend only within their block of consecutive tokens",
            Paper("Block Transformer: Global-to-Local Language Modeling for Fast Inference", 2024, "2406.02657"),
            _mha(pattern=lambda h, d, n: BlockLocal(max(1, min(64, n // 4))))),
    Variant("halo", "pattern", "2-D blocks of queries attend to their block plus a halo of keys",
            Paper("Scaling Local Self-Attention for Parameter Efficient Visual Backbones", 2021, "2103.12731"),
            _mha(pattern=lambda h, d, n: Halo(8, 3, grid=square_grid(n)))),
    Variant("neighborhood", "pattern", "2-D sliding window: each pixel sees a kernel x kernel window around it",
            Paper("Neighborhood Attention Transformer", 2022, "2204.07143"),
            _mha(pattern=lambda h, d, n: Neighborhood(7, grid=square_grid(n)))),
    Variant("dilated_neighborhood", "pattern", "2-D neighborhood over a dilated grid (every d-th pixel)",
            Paper("Dilated Neighborhood Attention Transformer", 2022, "2209.15001"),
            _mha(pattern=lambda h, d, n: Neighborhood(7, dilation=2, grid=square_grid(n)))),
    Variant("swin", "pattern", "windows of 8 x 8 pixels, shifted by half a window (Swin's shifted block)",
            Paper("Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", 2021, "2103.14030"),
            _mha(pattern=lambda h, d, n: ShiftedWindow(8, 4, grid=square_grid(n)))),
    Variant("cswin", "pattern", "half the heads attend in horizontal stripes, half in vertical ones",
            Paper("CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows",
                  2021, "2107.00652"),
            _mha(pattern=lambda h, d, n: CrossShapedWindow(2, square_grid(n), h))),
    Variant("axial", "pattern", "half the heads attend along the row, half along the column",
            Paper("Axial Attention in Multidimensional Transformers", 2019, "1912.12180"),
            _mha(pattern=lambda h, d, n: axial_rows_and_columns(h, square_grid(n)))),
    Variant("topk", "pattern", "each query keeps only its k highest-scoring keys (dynamic)",
            Paper("DLGSANet: Lightweight Dynamic Local and Global Self-Attention Networks for Image "
                  "Super-Resolution", 2023, "2301.02031"),
            _mha(pattern=lambda h, d, n: TopK(max(1, min(32, n // 4))))),
    Variant("routing", "pattern", "tokens routed to k-means clusters attend within their cluster (dynamic)",
            Paper("Efficient Content-Based Sparse Attention with Routing Transformers", 2020, "2003.05997"),
            _mha(pattern=lambda h, d, n: Routing(max(1, min(16, n // 64))) & Causal())),
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
    # issue 5: scores, positions and normalizers
    Variant("sigmoid", "normalizer", "sigmoid(logit - log n) per pair instead of the row softmax (causal)",
            Paper("Theory, Analysis, and Best Practices for Sigmoid Self-Attention", 2024, "2409.04431"),
            _mha(pattern=Causal(), normalizer="sigmoid")),
    Variant("gaam", "normalizer",
            "weights from learned per-head Gaussians over each row's standardised logits (causal)",
            Paper("Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across "
                  "Multiple Modalities", 2024, "2401.11143"),
            _mha(pattern=Causal(), normalizer=lambda h, d, n: GaussianAdaptive(h))),
    Variant("music_relative", "score",
            "learned per-head relative embeddings read through q (skewing, memory linear; causal)",
            Paper("Music Transformer", 2018, "1809.04281"),
            lambda dim, heads, n: RelativeAttention(dim, heads, max_distance=max(1, min(n - 1, 128)),
                                                    pattern=Causal())),
    Variant("rcmha", "score", "depthwise convolutions on q, k, v plus the relative term (causal)",
            Paper("RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling", 2023,
                  "2308.03429"),
            lambda dim, heads, n: RCMHA(dim, heads, max_distance=max(1, min(n - 1, 128)), pattern=Causal())),
    Variant("gpsa", "score",
            "per-head gate mixes content attention with a convolution-initialised positional map (2-D)",
            Paper("ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases", 2021,
                  "2103.10697"),
            lambda dim, heads, n: GatedPositionalAttention(dim, heads, grid=square_grid(n))),
    Variant("complex_rotation", "position",
            "per-head complex q, k: learned semantic-angle scale and position frequencies (causal)",
            Paper("ComplexFormer: Disruptively Advancing Transformer Inference Ability via Head-Specific "
                  "Complex Vector Attention", 2025, "2505.10222"),
            _mha(pattern=Causal(), position=lambda h, d, n: ComplexRotation(h, d))),
    Variant("attention_sinks", "pattern",
            "4 learnable key/value sinks every query sees, also outside its causal window",
            Paper("Efficient Streaming Language Models with Attention Sinks", 2023, "2309.17453"),
            lambda dim, heads, n: SinkAttention(dim, heads, sinks=4,
                                                pattern=SlidingWindow(default_window(n), 0))),
    # issue 7: linear and recurrent attention
    Variant("linear_elu", "linear", "no softmax: elu+1 features, causal state of sum k^T v, normalised",
            Paper("Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020, "2006.16236"),
            lambda dim, heads, n: LinearAttention(dim, heads)),
    Variant("slab_linear", "linear", "simplified linear attention: ReLU features, bidirectional, normalised",
            Paper("SLAB: Efficient Transformers with Simplified Linear Attention and Progressive "
                  "Re-parameterized Batch Normalization", 2024, "2405.11582"),
            lambda dim, heads, n: LinearAttention(dim, heads, feature_map="relu", causal=False)),
    Variant("retention", "linear", "no softmax: weights decay as gamma^(i-j), one gamma per head; GroupNorm, gate",
            Paper("Retentive Network: A Successor to Transformer for Large Language Models", 2023, "2307.08621"),
            lambda dim, heads, n: Retention(dim, heads)),
    Variant("rmt_manhattan", "linear", "2-D: softmax weights times gamma^(|dy|+|dx|), rows then columns",
            Paper("RMT: Retentive Networks Meet Vision Transformers", 2023, "2309.11523"),
            lambda dim, heads, n: ManhattanSelfAttention(dim, heads, square_grid(n))),
    Variant("lightning", "linear", "SiLU features, per-head decay, RMS norm and gate; dense blocks, recurrent between",
            Paper("TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer", 2023,
                  "2307.14995"),
            lambda dim, heads, n: LightningAttention(dim, heads)),
    Variant("aaren", "linear", "a learned query attends over every prefix by a parallel prefix scan (RNN)",
            Paper("Attention as an RNN", 2024, "2405.13956"),
            lambda dim, heads, n: Aaren(dim, heads)),
    # issue 8: packed variable-length batches
    Variant("packed_images_neighborhood", "pattern",
            "images of different sizes packed in one sequence, each with a 3 x 3 neighborhood on its own grid",
            Paper("Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio and Resolution", 2023,
                  "2307.06304"),
            _mha(pattern=lambda h, d, n: packed_images(n).each(lambda g: Neighborhood(3, grid=g)))),
    # issue 6: vision blocks on (batch, H, W, channels) maps, served on tokens of a square grid
    Variant("swin_block", "vision",
            "7x7 windows with a learned 2-D relative bias table; odd layers shift by 3 (Swin's block pair)",
            Paper("Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", 2021, "2103.14030"),
            VisionBuild(lambda dim, h, grid, layer: WindowAttention(dim, h, 7, 3 * (layer % 2)), hierarchical=True)),
    Variant("cswin_block", "vision",
            "half the heads in horizontal stripes of 2 rows, half in vertical ones, + LePE conv on values",
            Paper("CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows",
                  2021, "2107.00652"),
            VisionBuild(lambda dim, h, grid, layer: CrossShapedWindowAttention(dim, h, 2), hierarchical=True)),
    Variant("halonet_block", "vision", "8x8 query blocks see their block plus a 3-pixel halo, 2-D relative bias",
            Paper("Scaling Local Self-Attention for Parameter Efficient Visual Backbones", 2021, "2103.12731"),
            VisionBuild(lambda dim, h, grid, layer: HaloAttention(dim, h, 8, 3), hierarchical=True)),
    Variant("nat_block", "vision", "7x7 neighborhood around each pixel (NATTEN's edges), relative bias",
            Paper("Neighborhood Attention Transformer", 2022, "2204.07143"),
            VisionBuild(lambda dim, h, grid, layer: NeighborhoodAttention2d(dim, h, 7), hierarchical=True)),
    Variant("dinat_block", "vision", "7x7 neighborhoods, dilation 1 on even layers and 2 on odd ones",
            Paper("Dilated Neighborhood Attention Transformer", 2022, "2209.15001"),
            VisionBuild(lambda dim, h, grid, layer: NeighborhoodAttention2d(dim, h, 7, 1 + layer % 2),
                        hierarchical=True)),
    Variant("davit_block", "vision",
            "7x7 window attention on even layers, channel-group attention (channels as tokens) on odd ones",
            Paper("DaViT: Dual Attention Vision Transformers", 2022, "2204.03645"),
            VisionBuild(_alternate(lambda dim, h, grid: WindowAttention(dim, h, 7, relative_bias=None),
                                   lambda dim, h, grid: ChannelGroupAttention(dim, h)), hierarchical=True)),
    Variant("crossformer_block", "vision",
            "7x7 windows, then groups of pixels 4 apart, both with a dynamic position bias (an MLP of offsets)",
            Paper("CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention", 2021,
                  "2108.00154"),
            VisionBuild(_alternate(lambda dim, h, grid: WindowAttention(dim, h, 7, relative_bias="dynamic"),
                                   long_distance), hierarchical=True)),
    Variant("crossvit", "vision",
            "two branches (patches p and 2p) self-attend apart; each CLS token queries the other branch",
            Paper("CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification", 2021,
                  "2103.14899"),
            TwoBranchBuild()),
    Variant("medusa_heads", "vision", "head groups attend to keys/values average-pooled by 1, 2, 4, 8",
            Paper("MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for "
                  "Medical Image Analysis", 2021),
            VisionBuild(lambda dim, h, grid, layer: MultiScaleHeadAttention(dim, h, multiscale_scales(h)),
                        hierarchical=True)),
    Variant("dlgsa_block", "vision",
            "7x7 neighborhood attention on even layers, top-k (k = N/8) global attention on odd ones",
            Paper("DLGSANet: Lightweight Dynamic Local and Global Self-Attention Networks for Image "
                  "Super-Resolution", 2023, "2301.02031"),
            VisionBuild(_alternate(lambda dim, h, grid: NeighborhoodAttention2d(dim, h, 7),
                                   lambda dim, h, grid: SparseGlobalAttention(dim, h, max(1, grid[0] * grid[1] // 8))))),
    Variant("maformer", "vision", "7x7 windows and keys pooled 4x, mixed per pixel and head by a learned gate",
            Paper("MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual Recognition", 2022),
            VisionBuild(lambda dim, h, grid, layer: LocalGlobalAttention.maformer(dim, h), hierarchical=True)),
    Variant("duoformer", "vision", "half the heads in 7x7 windows, half on keys pooled 2x",
            Paper("DuoFormer: Leveraging Hierarchical Representations by Local and Global Attention Vision "
                  "Transformer", 2024),
            VisionBuild(lambda dim, h, grid, layer: LocalGlobalAttention.duoformer(dim, h), hierarchical=True)),
    Variant("transnext", "vision",
            "one softmax over a 3x3 sliding neighborhood and keys pooled 4x, cosine logits, learnable tokens",
            Paper("TransNeXt: Robust Foveal Visual Perception for Vision Transformers", 2023, "2311.17132"),
            VisionBuild(lambda dim, h, grid, layer: AggregatedAttention(dim, h, window=3, pool=4), hierarchical=True)),
    # issue 17: the seed papers' missing mechanisms
    Variant("landmark", "pattern",
            "every 64th token is a landmark; earlier blocks weighted by their landmark, softmax inside each (causal)",
            Paper("Landmark Attention: Random-Access Infinite Context Length for Transformers", 2023, "2305.16300"),
            lambda dim, heads, n: LandmarkAttention(dim, heads, block=landmark_block(n))),
    Variant("landmark_topk", "pattern",
            "Landmark Attention's retrieval: each query reads its 2 best blocks by landmark score + its own",
            Paper("Landmark Attention: Random-Access Infinite Context Length for Transformers", 2023, "2305.16300"),
            lambda dim, heads, n: LandmarkAttention(dim, heads, block=landmark_block(n), top_k=2)),
    Variant("seer", "pattern",
            "a gate on pooled q/k picks 4 key blocks per query block, block-sparse on those (gate trained apart: gate_loss)",
            Paper("SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", 2024, "2410.13276"),
            lambda dim, heads, n: SeerAttention(dim, heads, block=max(1, min(64, n // 16)), top_k=4).freeze_gate()),
    Variant("recycled", "pattern",
            "decoding the second half: a full step every 8 tokens, the others read its top N/8 keys + newer ones",
            Paper("Recycled Attention: Efficient inference for long-context language models", 2024, "2411.05787"),
            lambda dim, heads, n: RecycledAttention(dim, heads, stride=8, top_k=max(1, min(128, n // 8)), prompt=0.5)),
    Variant("dynamic_mask", "pattern",
            "each query keeps the N/4 earlier keys with the largest value-derived weight, added to their logits",
            Paper("Trainable Dynamic Mask Sparse Attention", 2025, "2508.02124"),
            lambda dim, heads, n: DynamicMaskAttention(dim, heads, window=max(1, n // 4))),
    Variant("sparsifiner", "pattern",
            "a low-rank predictor picks each query's N/8 keys for this input (predictor trained apart)",
            Paper("Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
                  2023, "2303.13755"),
            lambda dim, heads, n: Sparsifiner(dim, heads, top_k=max(1, n // 8), rank=8).freeze_predictor()),
    Variant("mesa", "memory",
            "causal attention computed exactly; backward from 8-bit per-head q, k, v (a quarter of their memory)",
            Paper("Mesa: A Memory-saving Training Framework for Transformers", 2021, "2111.11124"),
            lambda dim, heads, n: MesaAttention(dim, heads, pattern=Causal())),
    Variant("group_pose", "pattern",
            "pose queries: attention within each instance's group, then across instances of one type",
            Paper("Group Pose: A Simple Baseline for End-to-End Multi-person Pose Estimation", 2023, "2308.07313"),
            lambda dim, heads, n: GroupPoseAttention(dim, heads, *pose_groups(n))),
    Variant("cvt_block", "vision",
            "q, k, v from depthwise 3x3 conv + batch norm of the map; keys and values at stride 2 (4x fewer)",
            Paper("CvT: Introducing Convolutions to Vision Transformers", 2021, "2103.15808"),
            VisionBuild(lambda dim, h, grid, layer: ConvProjectionAttention(dim, h), hierarchical=True)),
    Variant("flatformer", "pattern",
            "tokens sorted window by window (8 x 8 windows), cut into equal groups of 64 that attend inside (2-D)",
            Paper("FlatFormer: Flattened Window Attention for Efficient Point Cloud Transformer", 2023, "2301.08739"),
            lambda dim, heads, n: FlattenedWindowAttention(dim, heads, group=min(64, n), window=8.0,
                                                           grid=square_grid(n))),
    Variant("histoformer", "pattern",
            "tokens sorted by intensity into bins of N/4: half the heads attend within a bin, half across bins",
            Paper("Restoring Images in Adverse Weather Conditions via Histogram Transformer", 2024, "2407.10172"),
            lambda dim, heads, n: HistogramAttention(dim, max(2, heads), group=max(1, n // 4))),
    Variant("fcaformer", "cross",
            "a 2-block stage: block 2 also attends to block 1's tokens, merged 4x and scaled per channel",
            Paper("FcaFormer: Forward Cross Attention in Hybrid Vision Transformer", 2022, "2211.07198"),
            lambda dim, heads, n: FcaStage(dim, heads, depth=2, merge=4)),
    Variant("minimal_attention", "topology-ablation",
            "one symmetric q = k projection per head, no W_V or W_O: heads mix their input slices (causal)",
            Paper("Reducing the Transformer Architecture to a Minimum", 2024),
            lambda dim, heads, n: MinimalAttention(dim, heads, qk="symmetric", values=False, pattern=Causal())),
    Variant("shared_axes", "pattern",
            "attention along time, then along frequency, with one shared set of weights (2-D: rows x columns)",
            Paper("MambAttention: Mamba with Multi-Head Attention for Generalizable Single-Channel Speech "
                  "Enhancement", 2025),
            lambda dim, heads, n: SharedAxisAttention(dim, heads, square_grid(n))),
    Variant("lrgt", "pattern",
            "4 views: attention within each view, then in 8 groups that take every 8th token of every view",
            Paper("Long-Range Grouping Transformer for Multi-View 3D Reconstruction", 2023),
            lambda dim, heads, n: LongRangeGroupingAttention(dim, heads, *view_groups(n))),
    Variant("fit", "pattern",
            "groups of 64 attend inside; 4 latents per group write, attend globally, and are read back",
            Paper("FIT: Far-reaching Interleaved Transformers", 2023, "2305.12689"),
            lambda dim, heads, n: FITBlock(dim, heads, group=max(g for g in (64, 32, 16, 8, 4, 2, 1) if n % g == 0),
                                           latents=4, max_groups=n)),
    Variant("glmix_block", "vision",
            "3x3 depthwise conv on the grid + attention over 16 soft-clustered semantic slots, dispatched back",
            Paper("Revisiting the Integration of Convolution and Attention for Vision Backbone", 2024, "2411.14429"),
            VisionBuild(lambda dim, h, grid, layer: SlotAttention2d(dim, h, slots=16), hierarchical=True)),
    Variant("combiner", "pattern",
            "own block of sqrt(N) tokens directly, each earlier block through one summary token (causal)",
            Paper("Combiner: Full Attention Transformer with Sparse Computation Cost", 2021, "2107.05768"),
            lambda dim, heads, n: CombinerAttention(dim, heads, block=max(1, math.isqrt(n)))),
    Variant("long_short_query", "pattern",
            "two queries per position, its token and the mean of its last 8, over the same causal keys, mixed",
            Paper("Multi-Query Self-Attention with Transition-Aware Embedding Distillation for Sequential "
                  "Recommendation", 2023),
            lambda dim, heads, n: LongShortQueryAttention(dim, heads, window=8)),
    Variant("dhvt_head_tokens", "topology",
            "one token per head summarising its channel group joins the attention, then merges into token 0",
            Paper("Bridging the Gap Between Vision Transformers and Convolutional Neural Networks on Small "
                  "Datasets", 2022, "2210.05958"),
            lambda dim, heads, n: HeadTokenAttention(dim, heads)),
    Variant("titans_mag", "memory",
            "a causal window plus a neural memory trained while reading (gradient steps with momentum), gated",
            Paper("Titans: Learning to Memorize at Test Time", 2024, "2501.00663"),
            lambda dim, heads, n: TitansGatedAttention(dim, heads, window=default_window(n), persistent=4)),
    Variant("illama", "score",
            "causal attention eased in by a soft mask: future keys weighted by a rate decayed 1 -> 0 (here 0)",
            Paper("Adapting LLaMA Decoder to Vision Transformer", 2024, "2404.06773"),
            lambda dim, heads, n: SoftCausalAttention(dim, heads)),
    Variant("p_adapter", "normalizer",
            "adds a p-Laplacian adapter: the map re-weighted by feature distances (p 1.25), renormalised, "
            "aggregating dim/8 features",
            Paper("p-Laplacian Adaptation for Generative Pre-trained Vision-Language Models", 2024, "2312.10613"),
            lambda dim, heads, n: _p_adapter(dim, heads)),
    Variant("sret", "pattern",
            "one block applied twice (shared weights): full attention, then attention in 4 token slices",
            Paper("Sliced Recursive Transformer", 2021, "2111.05297"),
            lambda dim, heads, n: SlicedRecursiveBlock(dim, heads, groups=(1, 4))),
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
