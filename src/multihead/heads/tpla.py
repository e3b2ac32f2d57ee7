"""Tensor-Parallel Latent Attention (TPLA; Tang et al., 2025, arXiv 2508.15881) on an MLA module."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..cache import CacheError, cached_attention
from ..errors import ShapeError
from ..nn.attention import attend, check_inputs, merge_heads
from ..patterns import PerHead
from .base import Costs, core_flops
from .latent import LatentCache, MultiHeadLatentAttention

ROPE_MODES = ("replicate", "split")


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal Walsh-Hadamard matrix of order ``n`` (a power of two): Sylvester's
    construction ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, divided by ``sqrt(n)``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ShapeError(f"a Hadamard transform needs a power-of-two size, got {n!r}; pass a PCA basis "
                         f"(pca_basis) or any orthogonal matrix as transform instead")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


@torch.no_grad()
def pca_basis(mla: MultiHeadLatentAttention, x: Tensor) -> Tensor:
    """An orthogonal ``(kv_rank, kv_rank)`` basis of ``mla``'s latents: the principal directions of
    the (normalised) latents ``c_t`` of the calibration batch ``x`` ``(batch, tokens, dim)``,
    columns in order of decreasing variance, so shard ``j`` of a ``TensorParallelLatentAttention``
    with this transform holds the ``j``-th block of components."""
    check_inputs(x, None, mla.dim)
    latent = mla.kv_norm(mla.kv_down(x)[..., : mla.kv_rank]).reshape(-1, mla.kv_rank).double()
    if latent.shape[0] < 2:
        raise ShapeError("pca_basis needs at least 2 calibration tokens")
    centred = latent - latent.mean(0)
    values, vectors = torch.linalg.eigh(centred.T @ centred / (latent.shape[0] - 1))
    return vectors.flip(-1).to(x.dtype)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of the ranks' partial outputs; the backward passes the gradient through
    unchanged (every rank holds the whole gradient of the replicated output: Megatron's row-parallel
    reduction)."""

    @staticmethod
    def forward(ctx, y: Tensor, group) -> Tensor:
        y = y.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class TensorParallelLatentAttention(Costs, nn.Module):
    """TPLA: an MLA module's attention with the latent split over ``shards`` tensor-parallel ranks.

    Against MLA (``heads.MultiHeadLatentAttention``, whose weights it reuses: no retraining) it
    changes how decoding reads the latent. In MLA's absorbed form head ``i`` scores a key with
    ``q~_i . c_t + q^R_i . k^R_t`` (``q~_i = W_UK^i^T q^C_i``) and reads ``W_UV^i sum_t p_t c_t``, so
    every rank of a tensor-parallel group must hold the whole latent cache. TPLA cuts the latent
    ``c_t`` (``kv_rank`` values) into ``shards`` contiguous slices ``c_t^(j)``, and with it the
    input dimension of every head (the matching slices of ``q~_i`` and of ``W_UV^i``'s columns);
    on rank ``j`` every head attends with its own softmax over its slice,

        p^(j)_{i,t} = softmax_t(scale * (q~_i^(j) . c_t^(j) + q^R_i . k^R_t)),
        y^(j) = W_O concat_i(W_UV^(i,j) sum_t p^(j)_{i,t} c_t^(j)),

    and the output is ``y = sum_j y^(j)``, one all-reduce. Each rank caches ``kv_rank / shards``
    latent values (plus the rotary key) per token instead of ``kv_rank``, and every head still reads
    the whole latent (through the sum), unlike grouped latent attention.

    ``transform``: an orthogonal ``U`` ``(kv_rank, kv_rank)`` applied before slicing - ``c' = c U``,
    ``q~' = q~ U``, ``W_UV' = W_UV U`` - which leaves full MLA unchanged (``q~' . c' = q~ . c``) and
    moves what each slice holds: ``"hadamard"`` (the orthonormal Walsh-Hadamard matrix, ``kv_rank`` a
    power of two), a PCA basis of calibration latents (``pca_basis``), or any orthogonal matrix.

    The paper fixes: the latent and each head's input dimension split over the devices, attention
    per shard, an all-reduce of the results, an orthogonal transform (Hadamard or PCA) before the
    slicing, MLA weights reused, prefill in MLA's form and decoding in TPLA's. What its text at hand
    (abstract and introduction) does not fix, and is chosen here: the decoupled rotary part is
    ``replicate``\\ d - every shard adds the whole ``q^R . k^R`` (and caches ``k^R``) - or, with
    ``rope="split"``, cut into ``shards`` contiguous slices like the latent; the logit scale is
    MLA's own ``1 / sqrt(head_dim + rope_dim)`` on every shard; the RMSNorm acts on the whole latent
    before the transform and the slicing; PCA components are sliced in order of decreasing variance.

    Without a cache, ``forward`` runs the TPLA form for every query (training, or a check of the
    formula). With a ``LatentCache`` (``new_cache()``), a call on an empty cache is the prefill: with
    ``mla_prefill=True`` (default) it runs MLA's own form (one shard: exact MLA) and caches the
    sharded latents; later calls decode in the TPLA form over the cache. ``shards=1`` is MLA.

    ``group``: a ``torch.distributed`` process group of ``shards`` ranks; rank ``j`` then computes
    and caches only shard ``j`` and the outputs are summed by an all-reduce (gradients of the
    replicated parameters are this rank's share: sum them over the group as tensor parallelism
    does). Without a group all shards run in this process, as one ``multihead.attention`` call in
    which the shards are key/value heads shared by the query heads (grouped-query layout).
    """

    def __init__(self, mla: MultiHeadLatentAttention, shards: int = 2, *, transform: str | Tensor | None = None,
                 rope: str = "replicate", mla_prefill: bool = True, group=None, backend: str | None = None):
        super().__init__()
        if not isinstance(mla, MultiHeadLatentAttention):
            raise ShapeError(f"TensorParallelLatentAttention wraps a MultiHeadLatentAttention, got "
                             f"{type(mla).__name__}")
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ShapeError(f"shards must be a positive integer, got {shards!r}")
        if mla.kv_rank % shards:
            raise ShapeError(f"the latent (kv_rank={mla.kv_rank}) does not split into {shards} equal shards; "
                             f"pick shards dividing kv_rank")
        if rope not in ROPE_MODES:
            raise ShapeError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
        if rope == "split" and mla.rope_dim % shards:
            raise ShapeError(f"rope='split' cuts the rotary part (rope_dim={mla.rope_dim}) into {shards} "
                             f"slices; pick shards dividing rope_dim, or rope='replicate'")
        if mla.score is not None or isinstance(mla.pattern, PerHead):
            raise ShapeError("TPLA runs the shards as extra heads of one attention call; an MLA with a score "
                             "or a per-head pattern is not served")
        self.rank = 0
        if group is not None:
            if not dist.is_initialized():
                raise ShapeError("group= needs an initialised torch.distributed process group")
            size = dist.get_world_size(group)
            if size != shards:
                raise ShapeError(f"the group has {size} ranks but shards={shards}; TPLA puts one shard per rank")
            self.rank = dist.get_rank(group)
        self.mla, self.shards, self.rope_mode, self.group = mla, shards, rope, group
        self.mla_prefill = bool(mla_prefill)
        self.backend = mla.backend if backend is None else backend
        self.pattern, self.score, self.dropout = mla.pattern, None, mla.dropout
        self.heads, self.dim = mla.heads, mla.dim
        self.register_buffer("transform", self._orthogonal(transform), persistent=True)

    def _orthogonal(self, transform) -> Tensor | None:
        n = self.mla.kv_rank
        if transform is None:
            return None
        if isinstance(transform, str):
            if transform != "hadamard":
                raise ShapeError(f"transform must be None, 'hadamard' or an orthogonal matrix, got {transform!r}")
            return hadamard(n, self.mla.kv_down.weight.dtype)
        if not isinstance(transform, Tensor) or transform.shape != (n, n):
            raise ShapeError(f"transform must be an orthogonal ({n}, {n}) matrix (kv_rank={n}), got "
                             f"{tuple(getattr(transform, 'shape', ())) or type(transform).__name__}")
        eye = torch.eye(n, dtype=torch.float64, device=transform.device)
        if not torch.allclose(transform.double().T @ transform.double(), eye, atol=1e-4):
            raise ShapeError("transform is not orthogonal (U^T U != I); TPLA's transform must leave MLA unchanged")
        return transform.detach().clone()

    # -- the pieces ------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Latent values per shard."""
        return self.mla.kv_rank // self.shards

    @property
    def rope_width(self) -> int:
        """Rotary key values each shard scores with."""
        return self.mla.rope_dim // self.shards if self.rope_mode == "split" else self.mla.rope_dim

    def local_shards(self) -> list[int]:
        """The shards this process computes: all of them, or its rank's with a group."""
        return [self.rank] if self.group is not None else list(range(self.shards))

    def up_weights(self) -> tuple[Tensor, Tensor]:
        """``W_UK`` ``(heads, head_dim, kv_rank)`` and ``W_UV U`` ``(heads, v_head_dim, kv_rank)``: the
        value up-projection in the transformed latent basis."""
        w_uk, w_uv = self.mla.up_weights()
        return w_uk, (w_uv if self.transform is None else w_uv @ self.transform)

    def _project(self, x: Tensor, start: int):
        """Absorbed queries ``q~ U`` ``(B, H, L, kv_rank)``, rotary queries ``(B, H, L, rope_dim)``,
        transformed latents ``c U`` ``(B, L, kv_rank)`` and rotary keys ``(B, 1, L, rope_dim)``."""
        mla = self.mla
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        q_content, q_rope = mla._queries(x).split([mla.head_dim, mla.rope_dim], dim=-1)
        q_rope = mla.rope.rotate(q_rope, positions)
        latent, k_rope = mla.kv_down(x).split([mla.kv_rank, mla.rope_dim], dim=-1)
        latent = mla.kv_norm(latent)
        k_rope = mla.rope.rotate(k_rope.unsqueeze(1), positions)
        q_latent = torch.einsum("bhld,hdc->bhlc", q_content, mla.up_weights()[0])
        if self.transform is not None:
            q_latent, latent = q_latent @ self.transform, latent @ self.transform
        return q_latent, q_rope, latent, k_rope

    def _sharded(self, q_latent, q_rope, latent, k_rope, shards: list[int]):
        """Per shard ``j`` in ``shards``: queries ``(B, len(shards) * H, L, w)`` (shard-major) and the
        shards as key/value heads ``(B, len(shards), T, w)``, ``w = width + rope_width``."""
        w, r = self.width, self.rope_width
        qs, ks = [], []
        for j in shards:
            part = slice(j * r, (j + 1) * r) if self.rope_mode == "split" else slice(None)
            qs.append(torch.cat([q_latent[..., j * w:(j + 1) * w], q_rope[..., part]], -1))
            ks.append(torch.cat([latent[:, None, :, j * w:(j + 1) * w], k_rope[..., part]], -1))
        return torch.cat(qs, 1), torch.cat(ks, 1)

    def _combine(self, out: Tensor, shards: list[int], width: int) -> Tensor:
        """``sum_j W_O concat_i(W_UV'^(i,j) o^(j)_i)`` for the shards' outputs ``(B, n * H, L, width)``."""
        batch, _, tokens, _ = out.shape
        w_uv = self.up_weights()[1]
        out = out.view(batch, len(shards), self.heads, tokens, width)
        cols = torch.stack([w_uv[..., j * width:(j + 1) * width] for j in shards])  # (n, H, v, width)
        return self.mla.out_proj(merge_heads(torch.einsum("bnhlw,nhvw->bhlv", out, cols)))

    # -- forward -----------------------------------------------------------------------------------
    def new_cache(self, capacity: int | None = None) -> LatentCache:
        """A ``LatentCache`` for this module: per token, each local shard's ``[c'^(j); k^R]`` as one
        key/value head (the rank's slice only, with a group)."""
        return LatentCache.for_pattern(self.pattern, capacity=capacity)

    def cache_refusal(self) -> str | None:
        from ..cache import refusal

        return refusal(self.pattern)

    def forward(self, x: Tensor, *, cache: LatentCache | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """``x`` ``(batch, tokens, dim)`` -> ``(batch, tokens, dim)``. With ``cache``, ``x`` holds the
        new tokens (which continue the cached positions) and ``key_padding_mask`` covers cached and
        new keys."""
        check_inputs(x, None, self.dim)
        if cache is not None and not isinstance(cache, LatentCache):
            raise CacheError(f"TPLA caches sharded latents: pass a LatentCache (module.new_cache()), got "
                             f"{type(cache).__name__}")
        start = 0 if cache is None else len(cache)
        q_latent, q_rope, latent, k_rope = self._project(x, start)
        shards = self.local_shards()
        dropout = self.dropout if self.training else 0.0
        scale = self.mla.scale
        if cache is not None:
            cache.bind(self.width)
            q, keys = self._sharded(q_latent, q_rope, latent, k_rope, shards)
            if start == 0 and self.mla_prefill:  # prefill in MLA's form (exact), caching the shards
                cache.append(keys, keys[..., : self.width])
                full_q = torch.cat([q_latent, q_rope], -1)
                full_k = torch.cat([latent.unsqueeze(1), k_rope], -1)
                out, _ = attend(self, full_q, full_k, latent.unsqueeze(1), key_padding_mask=key_padding_mask,
                                scale=scale)
                return self._combine(out, [0], self.mla.kv_rank)  # every rank computes the whole output
            out = cached_attention(cache, q, keys, keys[..., : self.width], pattern=self.pattern, scale=scale,
                                   backend=self.backend, dropout=dropout, key_padding_mask=key_padding_mask)
        else:
            q, keys = self._sharded(q_latent, q_rope, latent, k_rope, shards)
            out, _ = attend(self, q, keys, keys[..., : self.width], key_padding_mask=key_padding_mask, scale=scale)
        y = self._combine(out, shards, self.width)
        return y if self.group is None else _SumOverRanks.apply(y, self.group)

    # -- costs ---------------------------------------------------------------------------------
    def attention_flops(self, seq_len: int) -> int:
        """All shards of the TPLA form (absorbed: scores over ``width + rope_width`` per shard)."""
        return self.shards * core_flops(self.heads, seq_len, seq_len, self.width + self.rope_width, self.width)

    def kv_cache_elements(self) -> int:
        """Per rank: one latent slice and the rotary key (or its slice)."""
        return self.width + self.rope_width

    def cost_note(self, seq_len: int) -> str:
        return (f"{self.shards} shards; cache per rank: latent {self.width} + rotary key {self.rope_width} "
                f"(MLA: {self.mla.kv_rank} + {self.mla.rope_dim} on every rank); FLOPs of the absorbed form, all "
                f"shards (each rank 1/{self.shards})")

    def extra_repr(self) -> str:
        return (f"shards={self.shards}, rope={self.rope_mode!r}, transform="
                f"{'none' if self.transform is None else 'orthogonal'}, group={'yes' if self.group else 'no'}, "
                f"backend={self.backend!r}")
