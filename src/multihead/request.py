"""One attention call, validated: the tensors, the pattern, the score and the options."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import PatternError, ShapeError
from .normalizers import Normalizer, Softmax, as_normalizer
from .patterns import Full, Pattern
from .patterns.dynamic import split_dynamic
from .scores import Score, as_score
from .scores.reindexed import Reordered


@dataclass(frozen=True, eq=False)
class Request:
    """Validated arguments of ``multihead.attention``; backends read from it."""

    q: Tensor
    k: Tensor
    v: Tensor
    pattern: Pattern
    score: Score | None
    scale: float
    dropout: float
    return_weights: bool
    #: For a pattern resolved in a permuted frame (``Routing``): the original query / key at each
    #: position of q / k (``(B, H, L)``); ``restore`` maps results back.
    q_order: Tensor | None = None
    kv_order: Tensor | None = None
    #: Talking heads: ``(pre, post)``, each an ``(H, H)`` matrix or None, mixing the logits across
    #: heads before the softmax and the weights after it (``weights[g] = sum_h weights[h] M[h, g]``);
    #: None when not mixed. Only backends with ``supports_head_mix`` serve it.
    head_mix: tuple[Tensor | None, Tensor | None] | None = None
    #: How masked logits become weights (``multihead.normalizers``); backends declare which they serve.
    normalizer: Normalizer = Softmax()
    #: How a dynamic pattern was resolved (``Resolution.how``), for ``multihead.explain``.
    resolved_how: str = ""

    def restore(self, out: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Put the rows (and weight columns) of a permuted frame back in original order."""
        if self.q_order is None:
            return out, weights
        q_back = _inverse(self.q_order)
        out = _permute_tokens(out, q_back)
        if weights is not None:
            weights = _permute_tokens(weights, q_back)
            weights = weights.gather(3, _inverse(self.kv_order).unsqueeze(2).expand_as(weights))
        return out, weights

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def needs_grad(self) -> bool:
        params = list(self.score.parameters()) if self.score is not None else []
        params += [m for m in (self.head_mix or ()) if m is not None]
        if isinstance(self.normalizer, torch.nn.Module):  # a learnable normalizer (GAAM)
            params += list(self.normalizer.parameters())
        return torch.is_grad_enabled() and (
            any(t.requires_grad for t in (self.q, self.k, self.v)) or any(p.requires_grad for p in params))


def _inverse(order: Tensor) -> Tensor:
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


class _PermuteRows(torch.autograd.Function):
    """Rows of a ``(rows, width)`` tensor in a given order; the gradient goes back by the inverse
    order (a permutation moves each row once: no sums, unlike index_select's or gather's backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        return _take_rows(x, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return _take_rows(grad, _inverse(rows)), None


def _take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x[rows]`` into a kept buffer where the native kernel has one (no fresh pages to fault in)."""
    from .backends.native import empty

    return torch.index_select(x, 0, rows, out=empty((rows.numel(), x.shape[1]), x.dtype, x.device))


def _permute_tokens(x: Tensor, order: Tensor) -> Tensor:
    """``x[b, h, order[b, h, i]]`` at ``[b, h, i]``, for permutations ``order`` ``(B, H, L)``: whole
    rows taken from the flattened tokens (a gather along dim 2 reads an index per element)."""
    batch, heads, length = order.shape
    rows = order + torch.arange(0, batch * heads * length, length, device=order.device).view(batch, heads, 1)
    return _PermuteRows.apply(x.reshape(batch * heads * length, x.shape[-1]), rows.flatten()).view(x.shape)


def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ShapeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ShapeError(
                f"{name} must have shape (batch, heads, tokens, head_dim), got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ShapeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.shape[2] == 0 or t.shape[3] == 0:
            raise ShapeError(f"{name} has an empty tokens or head_dim axis: {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them")
    if not (q.device == k.device == v.device):
        raise ShapeError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ShapeError(f"q, k, v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ShapeError(
            f"k and v must have the same heads and tokens, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ShapeError(f"q and k must share head_dim, got {q.shape[3]} and {k.shape[3]}")
    if q.shape[1] % k.shape[1]:
        raise ShapeError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}) for "
            f"grouped-query attention; choose kv_heads dividing heads")


def _check_pattern(pattern: Pattern, batch: int, heads: int, q_len: int, kv_len: int, device,
                   empty_rows_ok: bool = False) -> None:
    if pattern.batch_size not in (None, 1, batch):
        raise PatternError(f"{pattern!r} is defined for batch size {pattern.batch_size}, not {batch}")
    if pattern.num_heads not in (None, 1, heads):
        raise PatternError(f"{pattern!r} is defined for {pattern.num_heads} heads, not {heads}")
    if empty_rows_ok:  # the normalizer gives a row that sees no key weights 0 (sigmoid)
        pattern.spans(q_len, kv_len, device)  # checks the lengths
        return
    empty = (_kept_first_empty_row if _is_value(pattern) else _first_empty_row)(pattern, q_len, kv_len, device)
    if empty is not None:
        b, h, i = empty
        raise PatternError(
            f"query {i} (batch element {b}, head {h}) can see no key under {pattern!r} with "
            f"q_len={q_len}, kv_len={kv_len}; its softmax would be NaN. Widen the pattern or drop "
            f"that query (e.g. a fully padded sequence, or more queries than keys under Causal)")


def _first_empty_row(pattern: Pattern, q_len: int, kv_len: int, device) -> tuple[int, int, int] | None:
    """(batch, head, query) of the first query that sees no key, or None; checks the lengths."""
    empty = pattern.empty_rows(q_len, kv_len, device).nonzero()
    return tuple(empty[0].tolist()) if len(empty) else None


# the same, kept for patterns that are values (``_is_value``): equal patterns and lengths ask once
_kept_first_empty_row = functools.lru_cache(maxsize=256)(_first_empty_row)


def _is_value(pattern) -> bool:
    """Whether a pattern is a value: equal patterns are equal by their numbers, with no tensor (a
    tensor inside, e.g. document boundaries, could change in place) and nothing data-dependent."""
    try:
        hash(pattern)
    except TypeError:
        return False
    if pattern.dynamic:
        return False
    for field in dataclasses.fields(pattern):
        value = getattr(pattern, field.name)
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, Tensor) or (isinstance(item, Pattern) and not _is_value(item)):
                return False
    return True


def _check_head_mix(head_mix, q: Tensor):
    """``head_mix`` as ``(pre, post)`` with each an ``(H, H)`` float tensor on q's device, or None."""
    if head_mix is None:
        return None
    if not isinstance(head_mix, (tuple, list)) or len(head_mix) != 2:
        raise ShapeError(f"head_mix must be a pair (pre, post) of (heads, heads) tensors or None, got "
                         f"{type(head_mix).__name__}")
    heads = q.shape[1]
    for name, m in zip(("pre", "post"), head_mix):
        if m is None:
            continue
        if not isinstance(m, Tensor) or not m.dtype.is_floating_point or tuple(m.shape) != (heads, heads):
            shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ShapeError(f"head_mix {name} must be a floating ({heads}, {heads}) tensor (the query "
                             f"heads), or None; got {shape}")
        if m.device != q.device:
            raise ShapeError(f"head_mix {name} is on {m.device} but q is on {q.device}; move it")
    return None if head_mix[0] is None and head_mix[1] is None else tuple(head_mix)


def make_request(q, k, v, *, pattern=None, score=None, scale=None, dropout=0.0,
                 return_weights=False, head_mix=None, normalizer=None) -> Request:
    """Check every argument and return a ``Request``; raises a ``ValueError`` subclass naming the fix."""
    _check_tensors(q, k, v)
    pattern = Full() if pattern is None else pattern
    if not isinstance(pattern, Pattern):
        raise PatternError(f"pattern must be a multihead Pattern, got {type(pattern).__name__}")
    score = as_score(score)
    if score is not None:
        score.check(q.shape[1])
    normalizer = as_normalizer(normalizer)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ShapeError(f"scale must be a positive finite number, got {scale!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ShapeError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    head_mix = _check_head_mix(head_mix, q)
    dynamic, within = split_dynamic(pattern)
    q_order = kv_order = None
    how = ""
    if dynamic is not None:
        resolution = dynamic.resolve(q, k, float(scale), within)
        pattern, q_order, kv_order, how = resolution.pattern, resolution.q_order, resolution.kv_order, resolution.how
        if q_order is not None:
            heads = q.shape[1]
            if k.shape[1] != heads:
                k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
            q, k, v = _permute_tokens(q, q_order), _permute_tokens(k, kv_order), _permute_tokens(v, kv_order)
            if score is not None:
                score = Reordered(score, q_order, kv_order)
            if head_mix is not None:
                raise PatternError(
                    f"head_mix (talking heads) cannot combine with {dynamic!r}: it reorders tokens per "
                    f"head, so the heads' logits no longer line up; use a static pattern or TopK")
    _check_pattern(pattern, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device,
                   normalizer.allows_empty_rows)
    return Request(q, k, v, pattern, score, float(scale), float(dropout), bool(return_weights),
                   q_order, kv_order, head_mix, normalizer, how)
