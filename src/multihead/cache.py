"""Key/value caches for decoding token by token, for every pattern that can be decoded causally.

``KVCache`` keeps the keys and values one attention layer has seen. It appends, keeps a rolling
window of the last ``window`` keys for local patterns (memory bounded by the window, not the
sequence: Beltagy et al., 2020, Longformer; Jiang et al., 2023, Mistral's rolling buffer), and keeps
``sinks`` leading keys beside that window (Xiao et al., 2023, "Efficient Streaming Language Models
with Attention Sinks", arXiv 2309.17453). ``KVCache.for_pattern(p)`` sizes it from the pattern.

A decoding step (``cached_attention``) asks the pattern for the keys of the new query as a few
intervals (``Pattern._spans``, analytic: no mask over the cache), gathers just those keys (a view
when they are one run of slots) and runs one attention call on them. The same intervals prove the
step exact: a pattern that lets a query see a key after it (``Full``, a two-sided window, a global
token's row, ``Routing``'s clusters) cannot be decoded causally and raises ``CacheError`` naming the
query and the key; so does a key the rolling window has already dropped. Nothing is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MultiheadError, PatternError
from .normalizers import Sigmoid, Softmax, as_normalizer
from .patterns import (BlockLocal, Dilated, Full, GlobalTokens, Halo, Intersection, KeyPadding,
                       Pattern, PerHead, SlidingWindow, Sinks, Spans, TopK, Union)
from .patterns.dynamic import split_dynamic
from .scores import Score, as_score

#: Rows of a pattern's intervals computed at once while decoding (amortises the tensor work).
PLAN_ROWS = 64
#: Keys beyond the last one that a step's intervals are asked about, to catch future keys.
HORIZON = 1 << 20


class CacheError(MultiheadError):
    """A cache used with inputs it does not fit, or a pattern that cannot be decoded with it."""


# -- how much of the past a pattern needs ----------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    """The keys a decoder must keep for a pattern: the first ``sinks`` and the last ``window``
    (``None``: all of them)."""

    sinks: int = 0
    window: int | None = None

    @property
    def bounded(self) -> bool:
        return self.window is not None

    def size(self) -> float:
        return float("inf") if self.window is None else self.sinks + self.window


def retention(pattern: Pattern | None) -> Retention:
    """What a causal decoder of ``pattern`` must keep, from the pattern's structure: a window for
    ``SlidingWindow``, ``Dilated``, ``BlockLocal`` and ``Halo`` (1-D), leading keys for ``Sinks`` and
    ``GlobalTokens``; an intersection keeps what its most local part keeps, a union what all parts
    keep, ``PerHead`` what its widest head keeps; anything else keeps every key."""
    if pattern is None:
        return Retention()
    dynamic, static = split_dynamic(pattern)
    if dynamic is not None:
        return retention(static)
    if isinstance(pattern, SlidingWindow):
        return Retention(0, pattern.left + 1)
    if isinstance(pattern, Dilated):
        return Retention(0, pattern.window * pattern.dilation + 1)
    if isinstance(pattern, Halo) and pattern.grid is None:
        return Retention(0, pattern.block + pattern.halo)
    if isinstance(pattern, BlockLocal) and pattern.grid is None:
        return Retention(0, pattern.block)
    if isinstance(pattern, GlobalTokens):
        return Retention(pattern.n, 0)
    if isinstance(pattern, Sinks) and not pattern.queries:
        inner = retention(pattern.pattern)
        return Retention(pattern.count + inner.sinks, inner.window)
    if isinstance(pattern, Intersection):
        return min((retention(p) for p in pattern.parts), key=Retention.size)
    if isinstance(pattern, (Union, PerHead)):
        parts = [retention(p) for p in (pattern.parts if isinstance(pattern, Union) else pattern.patterns)]
        if any(not r.bounded for r in parts):
            return Retention()
        return Retention(max(r.sinks for r in parts), max(r.window for r in parts))
    return Retention()


# -- the cache -------------------------------------------------------------------------------------


class KVCache:
    """The keys and values of one attention layer, for decoding.

    Args:
        window: keep only the last ``window`` keys (a ring buffer of ``sinks + window`` slots);
            None keeps every key.
        sinks: with ``window``, also keep the first ``sinks`` keys (attention sinks, global tokens).
        capacity: with ``window=None``, the most tokens the cache may hold (preallocated); decoding
            past it raises ``CacheError``. None grows the buffer as needed (doubling).

    The first call fixes the batch size, key/value heads, head widths, dtype and device; a later
    call with other ones raises ``CacheError``. ``len(cache)`` is the number of tokens seen (the
    position of the next one); ``bytes()`` the memory its buffers hold.
    """

    #: When set, the values are the first ``values_in_keys`` channels of the keys and are not
    #: stored apart (MLA's absorbed form: keys ``[c; k_R]``, values ``c``).
    values_in_keys: int | None = None

    def __init__(self, *, window: int | None = None, sinks: int = 0, capacity: int | None = None):
        for name, value, minimum in (("window", window, 1), ("capacity", capacity, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise CacheError(f"KVCache.{name} must be an integer >= {minimum} or None, got {value!r}")
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise CacheError(f"KVCache.sinks must be an integer >= 0, got {sinks!r}")
        if sinks and window is None:
            raise CacheError("KVCache.sinks only matters with a window (without one every key is kept); "
                             "pass window=... or sinks=0")
        if capacity is not None and window is not None:
            raise CacheError("KVCache takes a window (a ring buffer of sinks + window slots) or a capacity, "
                             "not both")
        self.window, self.sinks, self.capacity = window, sinks, capacity
        self.k: Tensor | None = None  # (batch, kv_heads, slots, head_dim)
        self._v: Tensor | None = None
        self.length = 0
        self._plans: dict = {}

    @classmethod
    def for_pattern(cls, pattern: Pattern | None, *, capacity: int | None = None, heads: int | None = None,
                    kv_heads: int | None = None):
        """A cache that keeps what ``pattern`` needs (``retention``): a rolling window with its
        sinks for local patterns, every key (up to ``capacity``) otherwise.

        Given the module's ``heads`` and ``kv_heads``, a pattern whose runs of heads keep different
        windows (``PerHead``; ``Pattern.head_groups``) that fall on whole groups of key/value heads
        gets a ``HeadSplitCache``: one cache per run, each bounded by its own window (MoA's
        heterogeneous spans, Fu et al., 2024, arXiv 2406.14909) instead of the widest one."""
        if heads is not None and kv_heads is not None and pattern is not None:
            split = _head_runs(pattern, heads, kv_heads)
            if split is not None:
                return HeadSplitCache(pattern, [(q0, q1, kv0, kv1, part, cls.for_pattern(part, capacity=capacity))
                                                for q0, q1, kv0, kv1, part in split])
        kept = retention(pattern)
        if kept.bounded:
            return cls(window=max(kept.window, 1), sinks=kept.sinks)
        return cls(capacity=capacity)

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        kind = (f"window={self.window}, sinks={self.sinks}" if self.window is not None
                else f"capacity={self.capacity}")
        return f"{type(self).__name__}({kind}, tokens={self.length})"

    @property
    def v(self) -> Tensor | None:
        if self.values_in_keys and self.k is not None:
            return self.k[..., : self.values_in_keys]
        return self._v

    @property
    def slots(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def bytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return sum(t.numel() * t.element_size() for t in (self.k, self._v) if t is not None)

    def reset(self) -> None:
        """Forget every token (and the shapes fixed by the first call)."""
        self.k = self._v = None
        self.length = 0
        self._plans = {}

    # -- positions and slots --------------------------------------------------------------------
    def kept(self, length: int | None = None) -> tuple[int, int, int]:
        """``(sink_end, first, end)``: with ``length`` tokens seen the cache holds the positions
        ``[0, sink_end)`` and ``[first, end)``."""
        length = self.length if length is None else length
        if self.window is None:
            return 0, 0, length
        sink_end = min(self.sinks, length)
        return sink_end, max(sink_end, length - self.window), length

    def slot_ranges(self, a: int, b: int) -> list[tuple[int, int]]:
        """The slot ranges holding positions ``[a, b)`` (which must be kept), in position order."""
        if self.window is None or b <= self.sinks:
            return [(a, b)]
        ranges = []
        if a < self.sinks:
            ranges.append((a, self.sinks))
            a = self.sinks
        s, w = self.sinks, self.window
        while a < b:
            slot = s + (a - s) % w
            run = min(b - a, s + w - slot)
            ranges.append((slot, slot + run))
            a += run
        return ranges

    def slot_positions(self) -> Tensor:
        """The position held in every slot (``-1``: empty), ``(slots,)``."""
        device = self.k.device
        positions = torch.full((self.slots,), -1, dtype=torch.long, device=device)
        sink_end, first, end = self.kept()
        for lo, hi in ((0, sink_end), (first, end)):
            at = 0
            for r0, r1 in self.slot_ranges(lo, hi):
                positions[r0:r1] = torch.arange(lo + at, lo + at + r1 - r0, device=device)
                at += r1 - r0
        return positions

    def ordered(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every kept key and value in position order, with their positions:
        ``(k, v, positions)``."""
        sink_end, first, end = self.kept()
        ranges = self.slot_ranges(0, sink_end) + self.slot_ranges(first, end)
        device = self.k.device
        positions = torch.cat([torch.arange(0, sink_end, device=device), torch.arange(first, end, device=device)])
        if len(ranges) == 1:
            (r0, r1), = ranges
            return self.k[:, :, r0:r1], self.v[:, :, r0:r1], positions
        index = torch.cat([torch.arange(r0, r1, device=device) for r0, r1 in ranges])
        return self.k.index_select(2, index), self.v.index_select(2, index), positions

    # -- writing --------------------------------------------------------------------------------
    def check(self, k: Tensor, v: Tensor) -> None:
        """Raise ``CacheError`` unless ``k`` / ``v`` ``(batch, kv_heads, tokens, dim)`` fit what the
        cache holds."""
        if not isinstance(k, Tensor) or not isinstance(v, Tensor) or k.dim() != 4 or v.dim() != 4 \
                or k.shape[:3] != v.shape[:3]:
            raise CacheError(f"a KVCache takes k and v of shape (batch, kv_heads, tokens, dim) with the same "
                             f"first three sizes, got {tuple(getattr(k, 'shape', ()))} and "
                             f"{tuple(getattr(v, 'shape', ()))}")
        if k.dtype != v.dtype:
            raise CacheError(f"k and v differ in dtype ({k.dtype}, {v.dtype})")
        if self.k is None:
            return
        held = self.k
        for name, have, got in (("batch size", held.shape[0], k.shape[0]), ("key/value heads", held.shape[1], k.shape[1]),
                                ("key width", held.shape[3], k.shape[3]), ("value width", self.v.shape[3], v.shape[3])):
            if have != got:
                raise CacheError(f"the cache holds {name} {have} but the new keys/values have {got}; use one "
                                 f"KVCache per layer and per batch of sequences (or reset() it)")
        if held.dtype != k.dtype:
            raise CacheError(f"the cache holds {held.dtype} keys but the new ones are {k.dtype}; cast the "
                             f"module, or start a new cache")
        if held.device != k.device:
            raise CacheError(f"the cache is on {held.device} but the new keys are on {k.device}; move the "
                             f"module, or start a new cache")

    def _reserve(self, k: Tensor, v: Tensor, needed: int) -> None:
        """Preallocated buffers: a ring of ``sinks + window`` slots, or ``capacity`` slots."""
        if self.window is not None:
            slots = self.sinks + self.window
        else:
            if needed > self.capacity:
                raise CacheError(f"decoding past the cache's capacity: {needed} tokens > capacity="
                                 f"{self.capacity}; build the cache with a larger capacity (or capacity=None "
                                 f"to grow it)")
            slots = self.capacity
        if self.k is not None:
            return
        batch, heads = k.shape[:2]
        self.k = k.new_empty(batch, heads, slots, k.shape[3])
        self._v = None if self.values_in_keys else v.new_empty(batch, heads, slots, v.shape[3])

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add the keys and values of the next tokens (positions ``len(self)`` onwards); with a
        window, only the sinks and the last ``window`` positions stay.

        Without a window or capacity the buffers grow by concatenation (memory: exactly the tokens
        held; gradients flow through them); a ring or a fixed capacity is written in place, so
        decode with those under ``torch.no_grad()``."""
        self.check(k, v)
        n = k.shape[2]
        start, end = self.length, self.length + n
        if self.window is None and self.capacity is None:
            self.k = k if self.k is None else torch.cat([self.k, k], 2)
            if not self.values_in_keys:
                self._v = v if self._v is None else torch.cat([self._v, v], 2)
            self.length = end
            return
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise CacheError(f"{self!r} is written in place, which gradients cannot flow through; decode under "
                             f"torch.no_grad(), or use a growing KVCache() (no window, no capacity) to train")
        self._reserve(k, v, end)
        if self.window is None:
            segments = [(start, end)]
        else:
            segments = [(start, min(end, self.sinks)), (max(start, self.sinks, end - self.window), end)]
        for lo, hi in segments:
            at = lo - start
            for r0, r1 in (self.slot_ranges(lo, hi) if hi > lo else ()):
                self.k[:, :, r0:r1] = k[:, :, at:at + r1 - r0]
                if not self.values_in_keys:
                    self._v[:, :, r0:r1] = v[:, :, at:at + r1 - r0]
                at += r1 - r0
        self.length = end


def _head_runs(pattern: Pattern, heads: int, kv_heads: int):
    """``(q0, q1, kv0, kv1, pattern)`` runs of query heads with one head-independent pattern each,
    on whole key/value groups, when their retentions differ; None otherwise."""
    dynamic, static = split_dynamic(pattern)
    if dynamic is not None or static.num_heads != heads or kv_heads < 1 or heads % kv_heads:
        return None
    runs = static.head_groups()
    group = heads // kv_heads
    if not runs or len(runs) < 2 or any(h0 % group or h1 % group for h0, h1, _ in runs):
        return None
    if len({retention(p) for _, _, p in runs}) < 2:
        return None
    return [(h0, h1, h0 // group, h1 // group, p) for h0, h1, p in runs]


class HeadSplitCache:
    """One ``KVCache`` per run of heads whose pattern keeps its own window (``PerHead`` with
    different spans): memory per run bounded by that run's window. Built by
    ``KVCache.for_pattern(pattern, heads=..., kv_heads=...)`` for that pattern only."""

    def __init__(self, pattern: Pattern, runs: list):
        self.pattern = pattern
        self.runs = runs  # (q0, q1, kv0, kv1, pattern of the run, its KVCache)

    def __len__(self) -> int:
        lengths = {len(run[-1]) for run in self.runs}
        return lengths.pop() if len(lengths) == 1 else max(lengths)

    def __repr__(self) -> str:
        parts = ", ".join(f"heads {q0}-{q1 - 1}: {cache!r}" for q0, q1, _, _, _, cache in self.runs)
        return f"HeadSplitCache({parts})"

    def bytes(self) -> int:
        return sum(run[-1].bytes() for run in self.runs)

    def reset(self) -> None:
        for run in self.runs:
            run[-1].reset()


class _HeadSlice(Score):
    """A score over heads ``[h0, h1)`` of the module, called with heads numbered from 0."""

    def __init__(self, score: Score, h0: int, h1: int):
        super().__init__()
        self.inner, self.h0 = score, h0
        self.additive, self.batch_dependent = score.additive, score.batch_dependent
        self.num_heads = None if score.num_heads is None else h1 - h0

    def check(self, heads):
        if self.num_heads is not None and heads != self.num_heads:
            raise CacheError(f"a score over {self.num_heads} heads got {heads}")

    def forward(self, score, b, h, q_idx, kv_idx):
        return self.inner(score, b, h + self.h0, q_idx, kv_idx)


class ModelCache(list):
    """One cache per layer of a model (``TransformerLM.make_cache``); ``len(cache)`` is the number
    of layers, ``cache.length`` the tokens seen."""

    @property
    def length(self) -> int:
        lengths = {len(c) for c in self}
        if len(lengths) > 1:
            raise CacheError(f"the layers' caches hold different numbers of tokens {sorted(lengths)}; feed "
                             f"every layer the same tokens (or make a new cache)")
        return lengths.pop() if lengths else 0

    def bytes(self) -> int:
        return sum(c.bytes() for c in self)


# -- patterns and scores over gathered keys -------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BooleanMask(Pattern):
    """An explicit mask ``(batch or 1, heads or 1, q_len, kv_len)``, True where a query may see a
    key: the pattern of a decoding step over gathered keys, and of a Hugging Face mask that has no
    structure. Its spans are the runs of True in each row."""

    mask: Tensor = field(repr=False)

    def __post_init__(self):
        if not isinstance(self.mask, Tensor) or self.mask.dtype != torch.bool or self.mask.dim() != 4:
            raise PatternError(f"mask must be a bool tensor (batch, heads or 1, q_len, kv_len), got "
                               f"{getattr(self.mask, 'dtype', type(self.mask))} {tuple(getattr(self.mask, 'shape', ()))}")

    @property
    def batch_size(self) -> int | None:
        return self.mask.shape[0] if self.mask.shape[0] > 1 else None

    @property
    def num_heads(self) -> int | None:
        return self.mask.shape[1] if self.mask.shape[1] > 1 else None

    def __repr__(self):
        return f"BooleanMask{tuple(self.mask.shape)}"

    def check(self, q_len, kv_len):
        if tuple(self.mask.shape[2:]) != (q_len, kv_len):
            raise PatternError(f"{self!r} does not fit q_len={q_len}, kv_len={kv_len}")

    def mask_mod(self, b, h, q_idx, kv_idx):
        offset = self.mask.shape[3] - self.mask.shape[2]
        b = b if self.mask.shape[0] > 1 else torch.zeros_like(b)
        h = h if self.mask.shape[1] > 1 else torch.zeros_like(h)
        return self.mask.to(q_idx.device)[b, h, q_idx - offset, kv_idx]

    def dense_mask(self, q_len, kv_len, device=None):
        self._checked(q_len, kv_len)
        return self.mask.to(device)

    def _spans(self, q_pos, kv_len):
        keep = self.mask.to(q_pos.device).long()
        rows = keep.flatten(0, 2)
        zero = rows.new_zeros(rows.shape[0], 1)
        edge = torch.diff(rows, dim=-1, prepend=zero, append=zero)  # +1 at a run's start, -1 after its end
        runs = max(int((edge == 1).sum(-1).max()), 1)
        starts = torch.full((rows.shape[0], runs), kv_len, device=rows.device)
        ends = starts.clone()
        for target, marker in ((starts, 1), (ends, -1)):
            hit = edge == marker
            row, col = hit.nonzero(as_tuple=True)
            target[row, (hit.long().cumsum(-1) - 1)[row, col]] = col
        shape = (*keep.shape[:3], runs)
        return Spans(starts.view(shape), ends.view(shape), kv_len)


class PositionedScore(Score):
    """``score`` evaluated at the absolute positions of the queries and of gathered keys:
    ``q_pos`` ``(q_len,)`` and ``kv_pos`` ``(kv_len,)`` or ``(B', H', kv_len)``."""

    def __init__(self, score: Score, q_pos: Tensor, kv_pos: Tensor):
        super().__init__()
        self.inner, self.q_pos, self.kv_pos = score, q_pos, kv_pos
        self.additive = score.additive
        self.num_heads = score.num_heads
        self.batch_dependent = score.batch_dependent or (kv_pos.dim() == 3 and kv_pos.shape[0] > 1)

    def check(self, heads):
        self.inner.check(heads)

    def forward(self, score, b, h, q_idx, kv_idx):
        q_pos = self.q_pos[q_idx - (self.kv_pos.shape[-1] - self.q_pos.shape[0])]
        if self.kv_pos.dim() == 1:
            kv_pos = self.kv_pos[kv_idx]
        else:
            bb = b if self.kv_pos.shape[0] > 1 else torch.zeros_like(b)
            hh = h if self.kv_pos.shape[1] > 1 else torch.zeros_like(h)
            kv_pos = self.kv_pos[bb, hh, kv_idx]
        return self.inner(score, b, h, q_pos, kv_pos)


# -- the decoding step ------------------------------------------------------------------------------


def _or_full(pattern: Pattern | None) -> Pattern:
    return Full() if pattern is None else pattern


def refusal(pattern: Pattern | None = None, normalizer=None) -> str | None:
    """Why ``pattern`` / ``normalizer`` cannot be decoded with a cache, whatever the positions
    (None: they may be; a pattern that looks ahead is caught at the step that would need it)."""
    normalizer = as_normalizer(normalizer)
    if isinstance(normalizer, Sigmoid) and normalizer.bias is None:
        return ("Sigmoid() without a bias uses -log(kv_len), the number of keys of the whole call, which a "
                "decoding step does not have; give it a fixed bias (Sigmoid(bias=-log(n))) to decode")
    if not isinstance(normalizer, (Softmax, Sigmoid)):
        return (f"{normalizer!r} normalises over the keys of the whole call; decoding with a cache serves "
                f"Softmax() and Sigmoid(bias=...)")
    dynamic = split_dynamic(pattern)[0] if pattern is not None else None
    if dynamic is not None and not isinstance(dynamic, TopK):
        return (f"{dynamic!r} groups queries and keys by content over the whole sequence, so a new token "
                f"changes what earlier ones attend to")
    return None


class _Plan:
    """A pattern's key intervals for decoding, ``PLAN_ROWS`` query positions at a time: python
    lists for a pattern the same for every batch element and head, tensors otherwise."""

    def __init__(self, pattern: Pattern, source: Pattern):
        self.pattern, self.source = pattern, source  # the static part, and the whole (kept alive)
        self.first = self.last = -1
        self.start = self.end = None  # (B', H', rows, K) tensors of the current block
        self.rows: list | None = None  # per row: list of (a, b), for B' = H' = 1

    def spans(self, lo: int, hi: int, device) -> Spans:
        """The disjoint intervals of query positions ``[lo, hi)`` (keys up to ``HORIZON`` past)."""
        q_pos = torch.arange(lo, hi, device=device)
        try:
            spans = self.pattern._spans(q_pos, hi + HORIZON)
        except MultiheadError as error:
            raise CacheError(f"{self.pattern!r} cannot give the keys of query positions {lo}..{hi - 1} for "
                             f"decoding: {error}") from None
        except (IndexError, RuntimeError) as error:
            raise CacheError(f"{self.pattern!r} is not defined at query positions {lo}..{hi - 1} (a pattern "
                             f"built for a fixed length or grid: {error}); build it for the whole sequence "
                             f"being decoded") from None
        return spans.disjoint

    def row(self, t: int, device):
        """``(start, end)`` tensors ``(B', H', K)`` of position ``t``, and the python intervals
        when the pattern is the same for every batch element and head."""
        if not self.first <= t < self.last:
            try:
                spans, lo, hi = self.spans(t, t + PLAN_ROWS, device), t, t + PLAN_ROWS
            except CacheError:
                spans, lo, hi = self.spans(t, t + 1, device), t, t + 1
            self.first, self.last = lo, hi
            self.start, self.end = spans.start, spans.end
            if spans.start.shape[:2] == (1, 1):
                rows = []
                for starts, ends in zip(spans.start[0, 0].tolist(), spans.end[0, 0].tolist()):
                    rows.append([(a, b) for a, b in zip(starts, ends) if b > a])
                self.rows = rows
            else:
                self.rows = None
        i = t - self.first
        return self.start[:, :, i], self.end[:, :, i], None if self.rows is None else self.rows[i]


def _future(pattern: Pattern, position: int, key: int, seen: int) -> CacheError:
    return CacheError(
        f"{pattern!r} cannot be decoded causally: the query at position {position} may see key {key}, "
        f"a later token (only {seen} are known when it is computed); decoding needs every query to see only earlier "
        f"keys (intersect the pattern with Causal(), or prefill past the tokens that look ahead, such as "
        f"a PrefixLM prefix)")


def _dropped(cache: KVCache, pattern: Pattern, position: int, key: int) -> CacheError:
    return CacheError(
        f"{pattern!r} lets the query at position {position} see key {key}, which {cache!r} has dropped "
        f"(it keeps the first {cache.sinks} and the last {cache.window} keys); build the cache with "
        f"KVCache.for_pattern(pattern) or a larger window")


def cached_attention(cache: KVCache, q: Tensor, k: Tensor, v: Tensor, *, pattern: Pattern | None = None,
                     score=None, scale: float | None = None, normalizer=None, head_mix=None,
                     dropout: float = 0.0, backend: str = "auto", key_padding_mask: Tensor | None = None) -> Tensor:
    """Attention of the new tokens' ``q`` ``(B, H, n, D)`` over the cached keys and their own ``k``,
    ``v`` ``(B, Hkv, n, D)``, which are appended to ``cache``; the new tokens hold positions
    ``len(cache) ..`` and ``pattern``, ``score`` act on those absolute positions, so the result
    equals attention over the whole sequence for the last ``n`` rows.

    One token (``n == 1``) reads just the keys its pattern's intervals name, as a view of the
    cache when they are one run of slots, and runs SDPA on them when there is no score; several
    tokens (a prompt) run one ``multihead.attention`` call (any backend) over the kept keys and
    theirs. ``key_padding_mask`` ``(B, len(cache) + n)`` (True at padding) hides keys.
    """
    from .functional import attention

    if isinstance(cache, HeadSplitCache):
        same = pattern is cache.pattern or (type(pattern) is type(cache.pattern) and pattern == cache.pattern)
        if not same:
            raise CacheError(f"this HeadSplitCache was built for {cache.pattern!r}, not {pattern!r}; build one with "
                             f"KVCache.for_pattern(pattern, heads=..., kv_heads=...) for each module")
        if head_mix is not None:
            raise CacheError("talking heads mix every head; use one KVCache for all heads, not a HeadSplitCache")
        score = as_score(score)
        outs = []
        for q0, q1, kv0, kv1, part, sub in cache.runs:
            outs.append(cached_attention(
                sub, q[:, q0:q1], k[:, kv0:kv1], v[:, kv0:kv1], pattern=part,
                score=None if score is None else _HeadSlice(score, q0, q1), scale=scale, normalizer=normalizer,
                dropout=dropout, backend=backend, key_padding_mask=key_padding_mask))
        return torch.cat(outs, 1)
    if not isinstance(cache, KVCache):
        raise CacheError(f"cache must be a multihead.cache.KVCache, got {type(cache).__name__}")
    normalizer = as_normalizer(normalizer)
    pattern = _or_full(pattern)
    plan = cache._plans.get(id(pattern))
    if plan is None or plan.source is not pattern or plan.normalizer != normalizer:
        reason = refusal(pattern, normalizer)
        if reason is not None:
            raise CacheError(f"cannot decode with a cache: {reason}")
        dynamic, static = split_dynamic(pattern)
        plan = cache._plans[id(pattern)] = _Plan(static, pattern)
        plan.dynamic, plan.normalizer = dynamic, normalizer
    dynamic, static = plan.dynamic, plan.pattern
    score = as_score(score)
    cache.check(k, v)
    if not isinstance(q, Tensor) or q.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise CacheError(f"q must be (batch, heads, tokens, dim) with the batch and tokens of k, got "
                         f"{tuple(getattr(q, 'shape', ()))} and k {tuple(k.shape)}")
    batch, heads, n, _ = q.shape
    if getattr(plan, "shape", None) != (batch, heads):
        for name, have, got in (("batch size", static.batch_size, batch), ("head count", static.num_heads, heads)):
            if have not in (None, 1, got):
                raise CacheError(f"{pattern!r} is defined for {name} {have}, but the queries have {got}")
        plan.shape = (batch, heads)
    start = len(cache)
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or
                                         tuple(key_padding_mask.shape) != (batch, start + n)):
        raise CacheError(f"with a cache, key_padding_mask must be a bool tensor (batch, cached + new tokens) = "
                         f"({batch}, {start + n}), got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    options = dict(scale=scale, normalizer=normalizer, head_mix=head_mix, dropout=dropout, backend=backend)
    if n == 1:
        return _step(cache, plan, q, k, v, start, score, dynamic, key_padding_mask, options, attention)
    return _prompt(cache, plan, q, k, v, start, score, dynamic, static, key_padding_mask, options, attention)


def _check_row(cache, plan, t, start, end, intervals) -> None:
    """Raise before anything is written if the query at ``t`` would see a later key, a key the
    cache has dropped, or no key."""
    sink_end, first, _ = cache.kept(t + 1)
    if intervals is not None:
        for a, b in intervals:
            if b > t + 1:
                raise _future(plan.source, t, max(a, t + 1), t + 1)
            if max(a, sink_end) < min(b, first):
                raise _dropped(cache, plan.source, t, max(a, sink_end))
        empty = not intervals
    else:
        live = end > start
        if bool((live & (end > t + 1)).any()):
            raise _future(plan.source, t, max(int(start[live & (end > t + 1)].min()), t + 1), t + 1)
        gap = live & (start.clamp(min=sink_end) < end.clamp(max=first))
        if bool(gap.any()):
            raise _dropped(cache, plan.source, t, max(int(start[gap].min()), sink_end))
        empty = not bool(live.any(-1).all())
    if empty:
        raise CacheError(f"the query at position {t} sees no key under {plan.source!r}; its softmax would be NaN")


def _step(cache, plan, q, k, v, t, score, dynamic, key_padding_mask, options, attention):
    """One query at position ``t``: checked, its key and value appended, then attended against
    the keys its intervals name."""
    device = q.device
    start, end, intervals = plan.row(t, device)
    _check_row(cache, plan, t, start, end, intervals)
    cache.append(k, v)
    if intervals is not None:
        ranges = [r for a, b in intervals for r in cache.slot_ranges(a, b)]
        ranges.sort()
        merged = [list(ranges[0])]
        for r0, r1 in ranges[1:]:
            if r0 == merged[-1][1]:
                merged[-1][1] = r1
            else:
                merged.append([r0, r1])
        if len(merged) == 1:
            (r0, r1), = merged
            k, v, index = cache.k[:, :, r0:r1], cache.v[:, :, r0:r1], None
        else:
            index = torch.cat([torch.arange(r0, r1, device=device) for r0, r1 in merged])
            k, v = cache.k.index_select(2, index), cache.v.index_select(2, index)
        valid = None
        positions = None
        if score is not None or key_padding_mask is not None:
            slots = cache.slot_positions()
            positions = slots[r0:r1] if index is None else slots[index]
        if key_padding_mask is not None:
            valid = ~key_padding_mask[:, positions].view(q.shape[0], 1, 1, -1)
    else:
        k, v, valid, positions = _gather(cache, q, start, end)
        if key_padding_mask is not None:
            rows = torch.arange(q.shape[0], device=device).view(-1, 1, 1)
            hidden = key_padding_mask[rows, positions.clamp(min=0).expand(q.shape[0], -1, -1)]
            valid = valid & ~hidden.unsqueeze(2)
    if valid is not None and not bool(valid.any(-1).all()):
        raise CacheError(f"a query at position {t} sees no key (all hidden by key_padding_mask or the pattern); "
                         f"its softmax would be NaN")
    plain = (score is None and dynamic is None and options["head_mix"] is None
             and isinstance(options["normalizer"], Softmax) and options["backend"] in ("auto", "sdpa"))
    if plain:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid, dropout_p=options["dropout"],
                                              scale=options["scale"], enable_gqa=q.shape[1] != k.shape[1])
    mask = None if valid is None else BooleanMask(valid)
    pattern = mask if dynamic is None else (dynamic if mask is None else dynamic & mask)
    if score is not None:
        score = PositionedScore(score, torch.tensor([t], device=q.device), positions)
    return attention(q, k, v, pattern=pattern, score=score, **options)


def _gather(cache, q, start, end):
    """Keys of intervals (already checked) that differ per batch element or head:
    ``(k, v, valid, positions)`` with one padded key list per (batch element, query head) when
    they differ per head."""
    device = q.device
    batch, heads = q.shape[:2]
    width = int(((end - start).clamp(min=0)).sum(-1).max())
    # positions of every key of each (b, h) row, padded with -1: cumulative interval lengths
    lengths = (end - start).clamp(min=0)
    offsets = lengths.cumsum(-1) - lengths
    slot = torch.arange(width, device=device)
    which = (slot.view(*([1] * lengths.dim()), -1) >= (offsets + lengths).unsqueeze(-1)).sum(-2)  # interval index
    which = which.clamp(max=lengths.shape[-1] - 1)
    positions = start.gather(-1, which) + slot - offsets.gather(-1, which)
    valid = slot < lengths.sum(-1, keepdim=True)
    positions = torch.where(valid, positions, torch.zeros_like(positions))
    if cache.window is None:
        slots = positions
    else:
        s, w = cache.sinks, cache.window
        slots = torch.where(positions < s, positions, s + (positions - s) % w)
    bp, hp = positions.shape[:2]
    kv_heads = cache.k.shape[1]
    b_idx = torch.arange(batch, device=device).view(-1, 1, 1)
    if hp > 1:  # per query head: read key/value head h // group
        h_idx = (torch.arange(heads, device=device) // (heads // kv_heads)).view(1, -1, 1)
    else:
        h_idx = torch.arange(kv_heads, device=device).view(1, -1, 1)
    slots = slots.expand(batch, h_idx.shape[1], width) if bp > 1 or hp > 1 else slots.expand(batch, kv_heads, width)
    k, v = cache.k[b_idx, h_idx, slots], cache.v[b_idx, h_idx, slots]
    positions = torch.where(valid, positions, torch.full_like(positions, -1))
    return k, v, valid.unsqueeze(2), positions


def _prompt(cache, plan, q, k, v, start, score, dynamic, static, key_padding_mask, options, attention):
    """Several new tokens: one attention call over the kept keys and the new ones, then append."""
    n = q.shape[2]
    device = q.device
    spans = plan.spans(start, start + n, device)
    live = spans.end > spans.start
    if bool((live & (spans.end > start + n)).any()):
        b, h, row, i = (live & (spans.end > start + n)).nonzero()[0].tolist()
        raise _future(plan.source, start + row, max(int(spans.start[b, h, row, i]), start + n), start + n)
    if start == 0:
        padding = None if key_padding_mask is None else KeyPadding(key_padding_mask)
        pattern = static if padding is None else static & padding
        try:
            pattern._checked(n, n)
            direct = True
        except PatternError:
            direct = False
        if direct:
            full = pattern if dynamic is None else dynamic & pattern
            out = attention(q, k, v, pattern=full, score=score, **options)
            cache.append(k, v)
            return out
    if start:
        old_k, old_v, old_pos = cache.ordered()
        keys, values = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)
        positions = torch.cat([old_pos, torch.arange(start, start + n, device=device)])
    else:
        keys, values, positions = k, v, torch.arange(n, device=device)
    inside = (positions >= spans.start.unsqueeze(-1)) & (positions < spans.end.unsqueeze(-1))
    mask = inside.any(-2)  # (B', H', n, kv)
    missing = (mask.sum(-1) != spans.counts()).nonzero()
    if len(missing):
        b, h, row = missing[0].tolist()
        held = set(positions.tolist())
        starts, ends = spans.start[b, h, row].tolist(), spans.end[b, h, row].tolist()
        key = next(p for a, e in zip(starts, ends) for p in range(a, e) if p not in held)
        raise _dropped(cache, plan.source, start + row, key)
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask[:, positions].view(q.shape[0], 1, 1, -1)
    pattern = BooleanMask(mask)
    if dynamic is not None:
        pattern = dynamic & pattern
    if score is not None:
        score = PositionedScore(score, torch.arange(start, start + n, device=device), positions)
    out = attention(q, keys, values, pattern=pattern, score=score, **options)
    cache.append(k, v)
    return out
