"""``MultiHeadAttention``: projections around the functional core, with GQA/MQA built in."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..functional import attention
from ..normalizers import Softmax, as_normalizer
from ..patterns import Documents, KeyPadding, Pattern
from ..scores import as_score


def check_inputs(x: Tensor, context: Tensor | None, dim: int, kv_dim: int | None = None) -> Tensor:
    """Check ``x`` ``(batch, tokens, dim)`` and ``context`` ``(batch, kv_tokens, kv_dim)``; return
    the context (``x`` itself for self-attention)."""
    context = x if context is None else context
    kv_dim = dim if kv_dim is None else kv_dim
    for name, t, width in (("x", x, dim), ("context", context, kv_dim)):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != width:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ShapeError(f"{name} must have shape (batch, tokens, {width}), got {shape}")
    if context.shape[0] != x.shape[0]:
        raise ShapeError(f"x and context batch sizes differ: {x.shape[0]} vs {context.shape[0]}")
    return context


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(batch, tokens, heads * d)`` -> ``(batch, heads, tokens, d)``."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(batch, heads, tokens, d)`` -> ``(batch, tokens, heads * d)``."""
    batch, heads, tokens, d = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * d)


def attend(module, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
           need_weights: bool = False, scale: float | None = None, head_mix=None, pattern=None,
           score=None):
    """``multihead.attention`` with the module's pattern (or ``pattern``), score (or ``score``),
    normalizer, dropout (while training) and backend, plus torch's ``key_padding_mask`` (True at
    padding). Returns ``(out, weights or None)``."""
    pattern = module.pattern if pattern is None else pattern
    score = module.score if score is None else score
    parallel = getattr(module, "context_parallel", None)
    if parallel is not None:
        if key_padding_mask is not None or need_weights or head_mix is not None:
            raise ShapeError("context_parallel does not serve key_padding_mask, need_weights or "
                             "head_mix; pack the batch (cu_seqlens=) instead of padding it")
        if not isinstance(getattr(module, "normalizer", None) or Softmax(), Softmax):
            raise ShapeError("context_parallel runs softmax attention only; drop the normalizer "
                             "or context_parallel")
        out = parallel.attention(q, k, v, pattern=pattern, score=score, scale=scale,
                                 dropout=module.dropout if module.training else 0.0,
                                 backend=module.backend)
        return out, None
    if key_padding_mask is not None:
        padding = KeyPadding(key_padding_mask)
        pattern = padding if pattern is None else pattern & padding
    options = dict(pattern=pattern, score=score, scale=scale, head_mix=head_mix,
                   normalizer=getattr(module, "normalizer", None))
    result = attention(q, k, v, **options, dropout=module.dropout if module.training else 0.0,
                       backend=module.backend, return_weights=need_weights)
    out, weights = result if need_weights else (result, None)
    return run_head_hooks(module, out, q, k, v, options, weights), weights


@dataclass
class AttentionCall:
    """One attention call as a head hook sees it: per-head ``q``, ``k``, ``v``, the options of
    ``multihead.attention`` that reproduce it (pattern, score, scale, head_mix; no dropout), and the
    weights when the backend returned them."""

    q: Tensor
    k: Tensor
    v: Tensor
    options: dict
    weights: Tensor | None = None


def run_head_hooks(module, out: Tensor, q: Tensor, k: Tensor, v: Tensor, options: dict,
                   weights: Tensor | None = None) -> Tensor:
    """Pass the head outputs ``out`` ``(B, H, Lq, Dv)`` through the hooks that
    ``multihead.analysis.add_head_hook`` put on ``module``; with none, ``out`` is returned as it is
    and nothing else is done. Hooks run after the attention and before the heads are combined; each
    takes ``(module, AttentionCall, out)`` and returns the (possibly changed) outputs."""
    hooks = getattr(module, "_head_hooks", ())
    if hooks:
        call = AttentionCall(q, k, v, options, weights)
        for hook in hooks:
            out = hook(module, call, out)
    return out


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be a positive integer, got {value!r}")
    return value


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al., 2017) over ``(batch, tokens, dim)`` inputs.

    ``kv_heads < heads`` gives grouped-query attention (Ainslie et al., 2023), ``kv_heads=1``
    multi-query attention (Shazeer, 2019): fewer key/value projections, each shared by a group of
    query heads. ``pattern``, ``score`` and ``position`` (e.g. ``RoPE``) choose the variant; the
    attention itself runs through ``multihead.attention`` on ``backend``.

    Args:
        dim: model width of the input and output.
        heads: query heads.
        kv_heads: key/value heads (default ``heads``); must divide ``heads``.
        head_dim: width of each head (default ``dim // heads``).
        pattern, score: passed to ``multihead.attention`` on every call.
        normalizer: ``multihead.normalizers`` ``Softmax()`` (default) or ``Sigmoid()`` (or a name).
        position: a module ``(q, k) -> (q, k)`` applied after projection (e.g. ``RoPE(head_dim)``).
        bias: whether the projections have a bias.
        dropout: dropout on the attention weights while training.
        backend: ``"auto"`` or a backend name.
        kv_dim: width of the ``context`` for cross-attention (default ``dim``).
        context_parallel: a ``torch.distributed`` process group (ring attention) or a
            ``multihead.distributed.ContextParallel``: the input is then this rank's shard of a
            sequence split over the group (``multihead.distributed.shard``), and the attention runs
            across the ranks.
    """

    #: Hooks on the head outputs (``multihead.analysis.add_head_hook``); none by default.
    _head_hooks: tuple = ()
    #: Whether ``pattern`` governs all the token mixing, so that ``pattern & Causal()`` makes the
    #: module causal (``multihead.models.make_causal``); False where the pattern is not the one used.
    pattern_restricts_mixing: bool = True
    #: Whether a subclass that overrides ``project``, ``mix_qk``, ``attention_options`` or ``combine``
    #: still decodes exactly with a ``KVCache`` (those steps act token by token, or keep their own
    #: state in the cache); unset, ``cache_refusal`` says why it cannot.
    decodes_with_cache: bool = False

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 pattern: Pattern | None = None, score=None, position: nn.Module | None = None,
                 bias: bool = True, dropout: float = 0.0, backend: str = "auto",
                 kv_dim: int | None = None, normalizer=None, context_parallel=None):
        super().__init__()
        dim = _positive_int("dim", dim)
        heads = _positive_int("heads", heads)
        kv_heads = _positive_int("kv_heads", heads if kv_heads is None else kv_heads)
        if heads % kv_heads:
            raise ShapeError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
        if head_dim is None:
            if dim % heads:
                raise ShapeError(f"dim ({dim}) is not divisible by heads ({heads}); pass head_dim explicitly")
            head_dim = dim // heads
        head_dim = _positive_int("head_dim", head_dim)
        kv_dim = _positive_int("kv_dim", dim if kv_dim is None else kv_dim)
        if not 0.0 <= dropout < 1.0:
            raise ShapeError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dim, self.heads, self.kv_heads, self.head_dim, self.kv_dim = dim, heads, kv_heads, head_dim, kv_dim
        self.pattern, self.dropout, self.backend = pattern, float(dropout), backend
        self.score = as_score(score)
        if self.score is not None:
            self.score.check(heads)
        self.position = position
        self.normalizer = as_normalizer(normalizer)
        if context_parallel is not None:
            from ..distributed import ContextParallel
            context_parallel = ContextParallel.of(context_parallel)
        self.context_parallel = context_parallel
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=bias)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, cu_seqlens: Tensor | None = None, cache=None):
        """Attend from ``x`` ``(batch, tokens, dim)`` to itself, or to ``context``
        ``(batch, kv_tokens, kv_dim)``.

        ``key_padding_mask`` ``(batch, kv_tokens)``, True at padding, hides those keys (torch's
        convention). Returns the output ``(batch, tokens, dim)``, or ``(output, weights)`` with
        per-head weights ``(batch, heads, tokens, kv_tokens)`` when ``need_weights``.

        ``cu_seqlens`` (``[0, l1, l1 + l2, ..., total]``) makes ``x`` a packed batch ``(total, dim)``
        (or ``(1, total, dim)``; ``multihead.varlen.pack``): each sequence attends only to itself,
        under the module's pattern in its own frame, and positions restart at every sequence, so the
        result equals the padded batch's on its real tokens. With ``context_parallel``, ``x`` is this
        rank's shard of the sequence (and ``cu_seqlens`` that of the whole packed sequence).

        ``cache`` (a ``multihead.cache.KVCache``) decodes: ``x`` holds the next tokens of the
        sequence whose keys and values the cache holds; positions continue from ``len(cache)``, the
        new keys are appended, and ``key_padding_mask`` then covers the cached and the new keys.

        The steps - ``project``, the attention call (``attention_options``, ``score_for``),
        ``combine`` - are methods that the topologies of ``multihead.heads`` override.
        """
        if cache is not None:
            return self._forward_cached(x, context, cache, key_padding_mask, need_weights, cu_seqlens)
        pattern, positions, squeeze = None, None, False
        if cu_seqlens is not None:
            if context is not None or key_padding_mask is not None:
                raise ShapeError("cu_seqlens packs self-attention inputs: pass no context and no "
                                 "key_padding_mask with it (packing already removed the padding)")
            if isinstance(x, Tensor) and x.dim() == 2:
                x, squeeze = x.unsqueeze(0), True
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[0] != 1:
                raise ShapeError(f"with cu_seqlens, x must be packed (total, {self.dim}) or "
                                 f"(1, total, {self.dim}), got {getattr(x, 'shape', x)!r}")
            documents = Documents(torch.as_tensor(cu_seqlens, device=x.device))
            pattern = documents if self.pattern is None else documents & self.pattern
        context = check_inputs(x, context, self.dim, self.kv_dim)
        if self.position is not None and (cu_seqlens is not None or self.context_parallel is not None):
            positions = self._positions(x.shape[1], x.device, None if cu_seqlens is None else documents)
        q, k, v = self.project(x, context) if positions is None else self.project(x, context, positions=positions)
        options = self.attention_options()
        if pattern is not None:
            if "pattern" in options:
                raise ShapeError(f"{type(self).__name__} sets its own pattern, which cu_seqlens cannot "
                                 f"restrict to each sequence; run the sequences as a padded batch")
            options["pattern"] = pattern
        out, weights = attend(self, q, k, v, key_padding_mask=key_padding_mask, need_weights=need_weights,
                              score=self.score_for(q, k), **options)
        y = self.combine(out, x)
        y = y.squeeze(0) if squeeze else y
        return (y, weights) if need_weights else y

    def cache_refusal(self) -> str | None:
        """Why this module cannot decode with a ``KVCache`` (None: it can)."""
        from ..cache import refusal

        if type(self).score_for is not MultiHeadAttention.score_for:
            return f"{type(self).__name__} makes its score from the queries of the whole call"
        steps = [name for name in ("project", "mix_qk", "attention_options", "combine")
                 if getattr(type(self), name) is not getattr(MultiHeadAttention, name)]
        if steps and not self.decodes_with_cache:
            return (f"{type(self).__name__} overrides {', '.join(steps)}, which may mix tokens; a subclass "
                    f"that acts token by token declares decodes_with_cache = True (tested: decoding equals "
                    f"recomputing)")
        if self.context_parallel is not None:
            return "context_parallel splits one sequence over ranks; decode on one rank"
        if self._head_hooks:
            return "head hooks (multihead.analysis) are attached; remove them to decode"
        return refusal(self.pattern, self.normalizer)

    def new_cache(self, capacity: int | None = None):
        """A decoding cache for this module: ``KVCache.for_pattern`` of its pattern (a rolling
        window for local patterns; one per run of heads for per-head windows)."""
        from ..cache import CacheError, KVCache

        reason = self.cache_refusal()
        if reason is not None:
            raise CacheError(f"{type(self).__name__} cannot decode with a cache: {reason}")
        return KVCache.for_pattern(self.pattern, capacity=capacity, heads=self.heads, kv_heads=self.kv_heads)

    def _forward_cached(self, x, context, cache, key_padding_mask, need_weights, cu_seqlens):
        from ..cache import CacheError, cached_attention

        reason = self.cache_refusal()
        if reason is not None:
            raise CacheError(f"{type(self).__name__} cannot decode with a cache: {reason}")
        if context is not None or cu_seqlens is not None or need_weights:
            raise CacheError("a cache serves self-attention decoding: pass no context, cu_seqlens or need_weights "
                             "with it")
        check_inputs(x, None, self.dim)
        start = len(cache)
        if self.position is not None:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
            q, k, v = self.project(x, x, positions=positions)
        else:
            q, k, v = self.project(x, x)
        options = self.attention_options()
        pattern = options.pop("pattern", self.pattern)
        out = cached_attention(cache, q, k, v, pattern=pattern, score=self.score_for(q, k),
                               normalizer=self.normalizer, dropout=self.dropout if self.training else 0.0,
                               backend=self.backend, key_padding_mask=key_padding_mask, **options)
        return self.combine(out, x)

    def _positions(self, tokens: int, device, documents: Documents | None) -> Tensor:
        """Positions of the tokens of ``x``: global under context parallelism, and counted from each
        document's start when packed."""
        if self.context_parallel is not None:
            positions = self.context_parallel.positions(tokens, device)
        else:
            positions = torch.arange(tokens, device=device)
        if documents is not None:
            starts = torch.tensor([s for s, _ in documents.bounds()[0]], device=device)
            doc = documents.doc_ids[0].to(device)[positions]
            positions = positions - starts[doc]
        return positions

    def project(self, x: Tensor, context: Tensor, *, positions: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head ``q, k, v`` ``(batch, heads, tokens, head_dim)``, positions applied (at
        ``positions`` of the self-attention tokens when given: packed or split sequences)."""
        q, k = self.mix_qk(self.q_proj(x), self.k_proj(context))
        q, k = split_heads(q, self.heads), split_heads(k, self.kv_heads)
        v = split_heads(self.v_proj(context), self.kv_heads)
        if self.position is not None:
            q, k = self.position(q, k) if positions is None else self.position(q, k, positions, positions)
        return q, k, v

    def mix_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Transform the projected ``q`` ``(B, L, heads * head_dim)`` and ``k`` before the head
        split (identity here)."""
        return q, k

    def attention_options(self) -> dict:
        """Extra keyword arguments of ``multihead.attention`` (none here)."""
        return {}

    def score_for(self, q: Tensor, k: Tensor):
        """The score of a call with per-head ``q`` and ``k`` (``self.score`` here; variants whose
        score reads the queries, such as relative embeddings, override it)."""
        return self.score

    def combine(self, out: Tensor, x: Tensor) -> Tensor:
        """Head outputs ``(B, heads, L, head_dim)`` -> ``(B, L, dim)``: concatenate, project."""
        return self.out_proj(merge_heads(out))

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, **kwargs) -> "MultiHeadAttention":
        """A ``MultiHeadAttention`` with the weights of ``torch.nn.MultiheadAttention``.

        The result takes batch-first inputs whatever ``module.batch_first`` is. ``kwargs`` (pattern,
        score, backend, ...) are passed to the constructor. Modules with ``add_bias_kv``,
        ``add_zero_attn`` or different key and value widths are not supported.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise ShapeError(f"from_torch takes a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.add_zero_attn:
            raise ShapeError("from_torch does not support add_bias_kv or add_zero_attn; build the module without them")
        if module.kdim != module.vdim:
            raise ShapeError(f"from_torch needs kdim == vdim, got {module.kdim} and {module.vdim}")
        dim, heads = module.embed_dim, module.num_heads
        has_bias = module.in_proj_bias is not None
        new = cls(dim, heads, bias=has_bias, dropout=module.dropout, kv_dim=module.kdim, **kwargs)
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = module.in_proj_bias.chunk(3) if has_bias else (None,) * 3
        with torch.no_grad():
            for proj, weight, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                proj.weight.copy_(weight)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(module.out_proj.weight)
            if has_bias:
                new.out_proj.bias.copy_(module.out_proj.bias)
        return new.to(module.out_proj.weight.device, module.out_proj.weight.dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"pattern={self.pattern!r}, normalizer={self.normalizer!r}, "
                f"backend={self.backend!r}")

