"""Multi-head Latent Attention (MLA; DeepSeek-V2, arXiv 2405.04434, and DeepSeek-V3, arXiv 2412.19437)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache import CacheError, KVCache, cached_attention
from ..errors import ShapeError
from ..scores import RoPE, as_score
from ..nn.attention import attend, check_inputs, merge_heads
from .base import Costs, core_flops


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


class LatentCache(KVCache):
    """The decoding cache of ``MultiHeadLatentAttention``: per token, the normalised KV latent
    ``c_t`` (``kv_rank`` values) and the rotated shared rotary key ``k^R_t`` (``rope_dim`` values),
    held as one key/value head ``[c_t; k^R_t]`` whose values are its first ``kv_rank`` channels.

    A ``multihead.cache.KVCache`` (same arguments: ``window``, ``sinks``, ``capacity``;
    ``LatentCache.for_pattern(p)`` keeps what ``p`` needs, e.g. a rolling window). Pass one per
    layer to every call of ``forward(..., cache=cache)``; each call appends its tokens (which continue
    the positions of the cached ones) and attends to them.
    """

    def bind(self, kv_rank: int) -> None:
        """Fix the latent width on first use (and check it afterwards)."""
        if self.values_in_keys is None:
            self.values_in_keys = kv_rank
        elif self.values_in_keys != kv_rank:
            raise CacheError(f"this LatentCache holds latents of {self.values_in_keys} values, the module makes "
                             f"{kv_rank}; use one cache per layer")

    @property
    def latent(self) -> Tensor | None:
        """The kept latents ``(batch, tokens, kv_rank)`` in position order."""
        return None if self.k is None else self.ordered()[0][:, 0, :, : self.values_in_keys]

    @property
    def rope_key(self) -> Tensor | None:
        """The kept rotary keys ``(batch, 1, tokens, rope_dim)`` in position order."""
        return None if self.k is None else self.ordered()[0][..., self.values_in_keys:]


class MultiHeadLatentAttention(Costs, nn.Module):
    """Multi-head Latent Attention: keys and values from one low-rank latent per token.

    Against standard multi-head attention it changes the projections. Per token ``h_t``:

    * ``c_t = RMSNorm(W_DKV h_t)`` (``kv_rank`` values) is the only content the keys and values come
      from: ``k^C_{t,i} = W_UK^i c_t``, ``v_{t,i} = W_UV^i c_t`` for head ``i``;
    * queries: ``q^C_{t,i}`` and ``q^R_{t,i}`` from ``h_t`` directly, or with ``q_rank`` through a
      latent ``c^Q_t = RMSNorm(W_DQ h_t)`` (DeepSeek-V2's low-rank queries);
    * decoupled RoPE: a rotary key ``k^R_t = RoPE(W_KR h_t)`` (``rope_dim`` values) shared by all
      heads, and per-head rotary queries ``q^R_{t,i} = RoPE(W_QR^i ...)``;
    * head ``i`` attends with ``q = [q^C; q^R]``, ``k = [k^C; k^R]``, scale
      ``1 / sqrt(head_dim + rope_dim)``; outputs are concatenated and projected by ``W_O``.

    The RMSNorm on the latents follows the released DeepSeek-V2/V3 models (``latent_norm=False``
    drops it). Defaults follow DeepSeek-V2's ratios: ``kv_rank = 4 * head_dim``,
    ``rope_dim = head_dim // 2``, full-rank queries (``q_rank=None``, as DeepSeek-V2-Lite).

    **Absorbed form.** ``q^C . k^C = (W_UK^T q^C) . c``, so with the query absorbed into the latent
    space the attention runs as *one* shared key/value head (multi-query attention) over
    ``k = [c_t; k^R_t]`` and ``v = c_t``, and ``W_UV`` is applied to the head outputs afterwards. It
    equals the naive form up to rounding (tested); the latent and the rotary key are all a decoder
    keeps per token: ``kv_rank + rope_dim`` values against ``2 * heads * head_dim`` for MHA. Without
    a cache ``forward`` runs the naive form (training, prefill); with a ``LatentCache`` it runs the
    absorbed form (``absorbed=`` forces either). New tokens continue the cached positions and are
    aligned bottom-right with the cached keys, so ``Causal()`` is the usual decoding mask.
    """

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, *, kv_rank: int | None = None,
                 q_rank: int | None = None, rope_dim: int | None = None, v_head_dim: int | None = None,
                 rope_base: float = 10000.0, latent_norm: bool = True, pattern=None, score=None,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        dim, heads = _positive("dim", dim), _positive("heads", heads)
        if head_dim is None:
            if dim % heads:
                raise ShapeError(f"dim ({dim}) is not divisible by heads ({heads}); pass head_dim explicitly")
            head_dim = dim // heads
        head_dim = _positive("head_dim", head_dim)
        rope_dim = _positive("rope_dim", max(2, head_dim // 2 // 2 * 2) if rope_dim is None else rope_dim)
        if rope_dim % 2:
            raise ShapeError(f"rope_dim must be even (RoPE rotates pairs), got {rope_dim}")
        kv_rank = _positive("kv_rank", 4 * head_dim if kv_rank is None else kv_rank)
        v_head_dim = _positive("v_head_dim", head_dim if v_head_dim is None else v_head_dim)
        if q_rank is not None:
            q_rank = _positive("q_rank", q_rank)
        if not 0.0 <= dropout < 1.0:
            raise ShapeError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dim, self.heads, self.head_dim, self.rope_dim = dim, heads, head_dim, rope_dim
        self.kv_rank, self.q_rank, self.v_head_dim = kv_rank, q_rank, v_head_dim
        self.pattern, self.dropout, self.backend = pattern, float(dropout), backend
        self.score = as_score(score)
        if self.score is not None:
            self.score.check(heads)
        self.scale = (head_dim + rope_dim) ** -0.5
        qk_width = heads * (head_dim + rope_dim)
        if q_rank is None:
            self.q_proj = nn.Linear(dim, qk_width, bias=False)
        else:
            self.q_down = nn.Linear(dim, q_rank, bias=False)
            self.q_norm = nn.RMSNorm(q_rank) if latent_norm else nn.Identity()
            self.q_up = nn.Linear(q_rank, qk_width, bias=False)
        self.kv_down = nn.Linear(dim, kv_rank + rope_dim, bias=False)  # W_DKV and W_KR, one matmul
        self.kv_norm = nn.RMSNorm(kv_rank) if latent_norm else nn.Identity()
        self.kv_up = nn.Linear(kv_rank, heads * (head_dim + v_head_dim), bias=False)  # W_UK and W_UV
        self.out_proj = nn.Linear(heads * v_head_dim, dim, bias=False)
        self.rope = RoPE(rope_dim, base=rope_base)

    def _queries(self, x: Tensor) -> Tensor:
        q = self.q_proj(x) if self.q_rank is None else self.q_up(self.q_norm(self.q_down(x)))
        batch, tokens, _ = x.shape
        return q.view(batch, tokens, self.heads, self.head_dim + self.rope_dim).transpose(1, 2)

    def up_weights(self) -> tuple[Tensor, Tensor]:
        """``W_UK`` ``(heads, head_dim, kv_rank)`` and ``W_UV`` ``(heads, v_head_dim, kv_rank)``."""
        w = self.kv_up.weight.view(self.heads, self.head_dim + self.v_head_dim, self.kv_rank)
        return w[:, : self.head_dim], w[:, self.head_dim:]

    def new_cache(self, capacity: int | None = None) -> LatentCache:
        """A ``LatentCache`` that keeps what the module's pattern needs (``KVCache.for_pattern``)."""
        return LatentCache.for_pattern(self.pattern, capacity=capacity)

    def cache_refusal(self) -> str | None:
        from ..cache import refusal

        return refusal(self.pattern)

    def forward(self, x: Tensor, *, cache: LatentCache | None = None, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, absorbed: bool | None = None):
        """``x`` ``(batch, tokens, dim)`` -> ``(batch, tokens, dim)`` (and the weights
        ``(batch, heads, tokens, kv_tokens)`` with ``need_weights``). With ``cache``, ``x`` holds the
        new tokens, ``key_padding_mask`` covers cached and new keys; the absorbed form then runs as
        a decoding step of ``multihead.cache`` (the keys its pattern names, a rolling window kept
        by a windowed cache), the naive one (``absorbed=False``, or ``need_weights``) over every
        cached latent."""
        check_inputs(x, None, self.dim)
        batch, tokens, _ = x.shape
        if cache is not None and not isinstance(cache, LatentCache):
            raise CacheError(f"MultiHeadLatentAttention caches latents: pass a LatentCache (module.new_cache()), "
                             f"got {type(cache).__name__}")
        start = 0 if cache is None else len(cache)
        positions = torch.arange(start, start + tokens, device=x.device)
        q = self._queries(x)
        q_content, q_rope = q.split([self.head_dim, self.rope_dim], dim=-1)
        q_rope = self.rope.rotate(q_rope, positions)
        latent, k_rope = self.kv_down(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        k_rope = self.rope.rotate(k_rope.unsqueeze(1), positions)  # (B, 1, L, rope_dim): one for all heads
        absorbed = (cache is not None) if absorbed is None else absorbed
        if cache is not None:
            cache.bind(self.kv_rank)
            keys = torch.cat([latent.unsqueeze(1), k_rope], dim=-1)  # one key/value head: [c_t; k^R_t]
            if absorbed and not need_weights:
                w_uk, w_uv = self.up_weights()
                q = torch.cat([torch.einsum("bhld,hdc->bhlc", q_content, w_uk), q_rope], dim=-1)
                out = cached_attention(cache, q, keys, keys[..., : self.kv_rank], pattern=self.pattern,
                                       score=self.score, scale=self.scale, backend=self.backend,
                                       dropout=self.dropout if self.training else 0.0,
                                       key_padding_mask=key_padding_mask)
                y = self.out_proj(merge_heads(torch.einsum("bhlc,hvc->bhlv", out, w_uv)))
                return y
            if cache.window is not None:
                raise CacheError("the naive form (absorbed=False or need_weights) reads every cached latent; "
                                 "use a LatentCache without a window for it")
            cache.append(keys, keys[..., : self.kv_rank])
            latent, k_rope = cache.latent, cache.rope_key
        if absorbed:
            out, weights = self._absorbed(q_content, q_rope, latent, k_rope, key_padding_mask, need_weights)
        else:
            out, weights = self._naive(q_content, q_rope, latent, k_rope, key_padding_mask, need_weights)
        y = self.out_proj(merge_heads(out))
        return (y, weights) if need_weights else y

    def _naive(self, q_content, q_rope, latent, k_rope, key_padding_mask, need_weights):
        batch, kv_tokens, _ = latent.shape
        kv = self.kv_up(latent).view(batch, kv_tokens, self.heads, -1).transpose(1, 2)
        k_content, v = kv.split([self.head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_content, q_rope], dim=-1)
        k = torch.cat([k_content, k_rope.expand(-1, self.heads, -1, -1)], dim=-1)
        return attend(self, q, k, v, key_padding_mask=key_padding_mask, need_weights=need_weights,
                      scale=self.scale)

    def _absorbed(self, q_content, q_rope, latent, k_rope, key_padding_mask, need_weights):
        w_uk, w_uv = self.up_weights()
        q = torch.cat([torch.einsum("bhld,hdc->bhlc", q_content, w_uk), q_rope], dim=-1)
        k = torch.cat([latent.unsqueeze(1), k_rope], dim=-1)  # one key/value head: [c_t; k^R_t]
        out, weights = attend(self, q, k, latent.unsqueeze(1), key_padding_mask=key_padding_mask,
                              need_weights=need_weights, scale=self.scale)
        return torch.einsum("bhlc,hvc->bhlv", out, w_uv), weights

    # -- costs ---------------------------------------------------------------------------------
    def attention_flops(self, seq_len: int) -> int:
        """The naive form (training, prefill)."""
        return core_flops(self.heads, seq_len, seq_len, self.head_dim + self.rope_dim, self.v_head_dim)

    def absorbed_attention_flops(self, q_len: int, kv_len: int) -> int:
        """The absorbed form (decoding): scores over ``kv_rank + rope_dim``, values over ``kv_rank``."""
        return core_flops(self.heads, q_len, kv_len, self.kv_rank + self.rope_dim, self.kv_rank)

    def kv_cache_elements(self) -> int:
        return self.kv_rank + self.rope_dim

    def cost_note(self, seq_len: int) -> str:
        step = self.absorbed_attention_flops(1, seq_len)
        return (f"cache: latent {self.kv_rank} + rotary key {self.rope_dim}; FLOPs of the naive form; one "
                f"absorbed decoding step over {seq_len} keys: {step / 1e6:.2f} MFLOPs")

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, rope_dim={self.rope_dim}, "
                f"kv_rank={self.kv_rank}, q_rank={self.q_rank}, pattern={self.pattern!r}, "
                f"backend={self.backend!r}")
