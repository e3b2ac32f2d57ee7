"""Compressed Convolutional Attention (CCA) and its grouped form CCGQA (Figliolia et al., Zyphra,
2025, arXiv 2510.04476)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from .base import Topology


class CausalConv(nn.Module):
    """A causal 1-D convolution over tokens of ``(batch, tokens, channels)``: token ``t`` sees
    tokens ``t - kernel + 1 .. t``. ``groups`` as ``nn.Conv1d``. Starts as the identity (only the
    current-token tap is non-zero), so a fresh module passes its input through."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(channels, channels, kernel, groups=groups, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            per_group = channels // groups
            index = torch.arange(channels)
            self.conv.weight[index, index % per_group, -1] = 1.0

    def forward(self, x: Tensor) -> Tensor:
        y = F.pad(x.transpose(1, 2), (self.kernel - 1, 0))
        return self.conv(y).transpose(1, 2)


class CompressedAttention(Topology):
    """Compressed Convolutional Attention: the whole attention runs in a compressed latent space.

    Against standard multi-head attention it shrinks everything inside the block by the
    ``compression`` factor ``C``: q, k and v are down-projected from ``dim`` to ``dim / C`` (``heads``
    latent heads of width ``dim / (C * heads)``), attention runs there, and the output projection
    maps ``dim / C`` back to ``dim``. Parameters, attention FLOPs and KV cache all fall by ``C``;
    ``kv_heads < heads`` shares latent key/value heads in groups (CCGQA), shrinking the cache further.

    What of the paper's form is implemented:

    * the down-projections, latent heads, grouped sharing (CCGQA) and up-projection: yes;
    * the convolutions on q and k (``conv_kernel``, default 3; 0 turns them off): a causal depthwise
      convolution over tokens, then a causal convolution over tokens and the channels of each head
      (grouped by head), both initialised to the identity. Causal, as the paper's decoder models;
      with non-causal patterns they still only look back;
    * the q-k mean (``qk_mean``): the mean of the pre-convolution q and k is added to both. For
      CCGQA our generalisation: query head ``h`` gets ``(q_h + k_{g(h)}) / 2`` and key head ``g`` gets
      ``(mean of its group's q_h + k_g) / 2`` (the paper's statement when every group has one head);
    * not implemented: the value shift (half of the value channels from the previous token) and the
      paper's L2 normalisation of q and k with a learnable temperature. RoPE in the latent space is
      available through ``position=RoPE(head_dim)``.

    With ``compression=1``, ``conv_kernel=0`` and ``qk_mean=False`` it is multi-head attention.
    Convolutions and the q-k mean need self-attention (``context`` is refused then), and the
    convolutions mix tokens before the attention, so ``key_padding_mask`` hides padded keys but
    neighbouring tokens still see their content. Decoding with a ``KVCache`` keeps the convolutions'
    last ``conv_kernel - 1`` inputs per stage beside the keys and values.
    """

    decodes_with_cache = True  # the convolutions keep their state in the cache (_forward_cached)

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, compression: int = 4,
                 conv_kernel: int = 3, qk_mean: bool = True, head_dim: int | None = None, **options):
        if isinstance(compression, bool) or not isinstance(compression, int) or compression < 1:
            raise ShapeError(f"compression must be a positive integer, got {compression!r}")
        if isinstance(conv_kernel, bool) or not isinstance(conv_kernel, int) or conv_kernel < 0:
            raise ShapeError(f"conv_kernel must be a non-negative integer (0: no convolutions), got {conv_kernel!r}")
        if head_dim is None:
            if dim % (compression * heads):
                raise ShapeError(f"dim ({dim}) must be divisible by compression * heads "
                                 f"({compression} * {heads}); pass head_dim explicitly")
            head_dim = dim // (compression * heads)
        super().__init__(dim, heads, kv_heads, head_dim=head_dim, **options)
        self.compression, self.conv_kernel, self.qk_mean = compression, conv_kernel, bool(qk_mean)
        if conv_kernel:
            q_width, k_width = heads * head_dim, self.kv_heads * head_dim
            self.q_conv = nn.Sequential(CausalConv(q_width, conv_kernel, q_width),
                                        CausalConv(q_width, conv_kernel, heads))
            self.k_conv = nn.Sequential(CausalConv(k_width, conv_kernel, k_width),
                                        CausalConv(k_width, conv_kernel, self.kv_heads))

    @property
    def latent_dim(self) -> int:
        return self.heads * self.head_dim

    def cost_note(self, seq_len: int) -> str:
        return (f"latent {self.latent_dim} = dim / {self.compression}: {self.heads} heads of "
                f"{self.head_dim}, {self.kv_heads} key/value heads")

    def forward(self, x: Tensor, context: Tensor | None = None, **kwargs):
        if context is not None and (self.conv_kernel or self.qk_mean):
            raise ShapeError("CompressedAttention with convolutions or qk_mean is self-attention only; "
                             "pass no context, or build it with conv_kernel=0, qk_mean=False")
        return super().forward(x, context, **kwargs)

    def _forward_cached(self, x, context, cache, key_padding_mask, need_weights, cu_seqlens):
        """Decoding: the convolutions continue from the last ``conv_kernel - 1`` inputs of each of
        their two stages, kept beside the keys and values (``cache.conv_state``)."""
        self._decoding = cache
        try:
            return super()._forward_cached(x, context, cache, key_padding_mask, need_weights, cu_seqlens)
        finally:
            self._decoding = None

    def _convolve(self, name: str, stages: nn.Sequential, x: Tensor) -> Tensor:
        cache = getattr(self, "_decoding", None)
        if cache is None:
            return stages(x)
        states = cache.__dict__.setdefault("conv_state", {})
        if len(cache) == 0:
            states.pop(name, None)  # a new sequence
        previous = states.get(name) or [x.new_zeros(x.shape[0], stage.kernel - 1, x.shape[2]) for stage in stages]
        kept = []
        for stage, state in zip(stages, previous):
            if state.shape[0] != x.shape[0] or state.dtype != x.dtype:
                from ..cache import CacheError

                raise CacheError(f"the cache's convolution state holds batch {state.shape[0]} ({state.dtype}), the "
                                 f"new tokens have batch {x.shape[0]} ({x.dtype}); start a new cache")
            extended = torch.cat([state, x], dim=1)
            kept.append(extended[:, extended.shape[1] - (stage.kernel - 1):])
            x = stage.conv(extended.transpose(1, 2)).transpose(1, 2)  # no padding: the state is the past
        states[name] = kept
        return x

    def mix_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        q_pre, k_pre = q, k
        if self.conv_kernel:
            q, k = self._convolve("q", self.q_conv, q), self._convolve("k", self.k_conv, k)
        if self.qk_mean:
            batch, tokens, _ = q.shape
            groups = self.heads // self.kv_heads
            qh = q_pre.view(batch, tokens, self.kv_heads, groups, self.head_dim)
            kh = k_pre.view(batch, tokens, self.kv_heads, 1, self.head_dim)
            q = q + ((qh + kh) / 2).reshape_as(q)
            k = k + ((qh.mean(3, keepdim=True) + kh) / 2).reshape_as(k)
        return q, k
