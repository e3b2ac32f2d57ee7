"""Dynamic patterns: which keys a query sees depends on q and k.

A ``DynamicPattern`` cannot answer ``mask_mod`` by itself; ``multihead.attention`` first calls its
``resolve(q, k, scale, within)``, which returns a static pattern (and possibly an order in which to
visit queries and keys) that every backend can run. ``within`` is the static part of an
intersection (``TopK(8) & Causal()`` selects among the keys ``Causal()`` allows).

Gradients: the selection itself is a discrete choice made without gradient; gradients reach q and k
through the logits of the pairs that were kept, exactly as through ``torch.topk`` (the choice is
treated as a constant, as in DLGSANet's and the Routing Transformer's implementations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import PatternError
from .base import Pattern, check_int
from .sequence import Causal, Full
from .spans import Spans

#: Largest number of logits TopK materialises at once while selecting (rows are chunked).
SELECTION_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True, eq=False)
class Resolution:
    """A dynamic pattern made static for one (q, k): the pattern, in the frame given by the orders.

    ``q_order`` / ``kv_order`` (``(B, H, L)`` permutations, or None for the identity) say which
    original query / key sits at each position of the frame the pattern is defined in.
    """

    pattern: Pattern
    q_order: Tensor | None = None
    kv_order: Tensor | None = None
    #: How it was resolved, for ``multihead.explain`` (empty: nothing to say)
    how: str = ""


class DynamicPattern(Pattern):
    """Base of patterns computed from q and k; see the module docstring."""

    def resolve(self, q: Tensor, k: Tensor, scale: float, within: Pattern) -> Resolution:
        raise NotImplementedError

    def _static_only(self, *args, **kwargs):
        raise PatternError(
            f"{self!r} depends on q and k: pass it to multihead.attention, or call "
            f".resolve(q, k, scale, within) for the static pattern of one input")

    dynamic = True
    mask_mod = _static_only
    _spans = _static_only
    dense_mask = _static_only


def _expand_heads(k: Tensor, heads: int) -> Tensor:
    return k.repeat_interleave(heads // k.shape[1], dim=1) if k.shape[1] != heads else k


# -- top-k ----------------------------------------------------------------------------------------


def _words(valid: Tensor) -> Tensor | None:
    """``valid`` (bool, ``(..., k)``) read 8 slots at a time as int64 words, where its rows pack into
    them: torch reduces bools a byte at a time, 15-50x slower on 16k x 64 slots."""
    width = valid.shape[-1]
    if width == 0 or width % 8 or not valid.is_contiguous() or valid.storage_offset() % 8 or valid.data_ptr() % 8:
        return None
    return valid.view(torch.int64)


_ALL_SET = int.from_bytes(bytes([1] * 8), "little")  # a word of 8 true slots


def any_slot(valid: Tensor) -> Tensor:
    """``valid.any(-1)``: a word of bools is above 0 where one of its bytes is 1."""
    words = _words(valid)
    return valid.any(-1) if words is None else words.amax(-1) > 0


def every_slot(valid: Tensor) -> bool:
    """``valid.all()``, a word at a time."""
    words = _words(valid)
    return bool(valid.all()) if words is None else bool((words == _ALL_SET).all())


@dataclass(frozen=True, eq=False)
class KeySelection(Pattern):
    """Static pattern: query row i sees the keys ``indices[b, h, i, :]`` where ``valid`` is True.

    ``indices`` and ``valid`` have shape ``(B, H, q_len, k)``; ``kv_len`` is the key count. Every
    index lies in ``[0, kv_len)``, and the valid keys of a row are distinct (as ``torch.topk``
    gives them): a backend attends every listed key once. What ``TopK`` resolves to; usable
    directly for any explicit per-query key lists.
    """

    indices: Tensor = field(repr=False)
    valid: Tensor = field(repr=False)
    kv_len: int
    pointwise = False  # mask_mod searches the row's list of keys

    def __post_init__(self):
        if self.indices.shape != self.valid.shape or self.indices.dim() != 4:
            raise PatternError(f"KeySelection needs indices and valid of one shape (B, H, q_len, k), got "
                               f"{tuple(self.indices.shape)} and {tuple(self.valid.shape)}")
        if self.valid.dtype != torch.bool or self.indices.dtype not in (torch.int32, torch.int64):
            raise PatternError(f"KeySelection needs integer indices and boolean valid, got "
                               f"{self.indices.dtype} and {self.valid.dtype}")
        low, high = torch.aminmax(self.indices) if self.indices.numel() else (0, 0)
        if self.indices.numel() and (int(low) < 0 or int(high) >= self.kv_len):
            raise PatternError(f"KeySelection indices must lie in [0, kv_len={self.kv_len}), in invalid "
                               f"slots too (backends gather them before masking)")
        # distinct valid keys per row: strictly ascending lists (what TopK gives) pass at once
        ascending = self.indices[..., 1:] > self.indices[..., :-1]
        if self.indices.shape[-1] > 1 and not bool(ascending.all()):
            spread = torch.arange(self.indices.shape[-1], device=self.indices.device) + 1
            keyed = torch.where(self.valid, self.indices, -spread).sort(-1).values
            if bool((keyed.diff(dim=-1) == 0).any()):
                raise PatternError("KeySelection lists a key twice in one row; list each key once "
                                   "(a backend would attend it twice)")

    @property
    def batch_size(self):
        return self.indices.shape[0]

    @property
    def num_heads(self):
        return self.indices.shape[1]

    def __repr__(self):
        return f"KeySelection(k={self.indices.shape[-1]})"

    def check(self, q_len, kv_len):
        if q_len != self.indices.shape[2] or kv_len != self.kv_len:
            raise PatternError(f"{self!r} was made for q_len={self.indices.shape[2]}, kv_len={self.kv_len}, "
                               f"not q_len={q_len}, kv_len={kv_len}")

    def key_lists(self):
        return self.indices, self.valid

    def mask_mod(self, b, h, q_idx, kv_idx):
        row = q_idx - (self.kv_len - self.indices.shape[2])
        hit = (self.indices[b, h, row] == kv_idx.unsqueeze(-1)) & self.valid[b, h, row]
        return hit.any(-1)

    def key_counts(self, q_len, kv_len, device=None):
        """The valid slots of each row (its keys are distinct), without building spans."""
        self._checked(q_len, kv_len)
        return self.valid.to(device).sum(-1)

    def empty_rows(self, q_len, kv_len, device=None):
        self._checked(q_len, kv_len)
        return ~any_slot(self.valid.to(device))

    def dense_mask(self, q_len, kv_len, device=None):
        """Scattered from the key lists (``mask_mod`` on the grid would compare every pair with
        every listed key)."""
        self._checked(q_len, kv_len)
        hits = torch.zeros(*self.indices.shape[:3], kv_len, dtype=torch.uint8, device=device)
        hits.scatter_add_(-1, self.indices.to(device), self.valid.to(device, torch.uint8))
        return hits > 0

    def _spans(self, q_pos, kv_len):
        start = torch.where(self.valid, self.indices, torch.zeros_like(self.indices))
        return Spans(start, start + self.valid.long(), kv_len)


@dataclass(frozen=True)
class TopK(DynamicPattern):
    """Each query keeps the ``k`` keys with the highest scaled ``q . k`` among those it may see.

    The sparse global attention of DLGSANet (Li et al., 2023, "DLGSANet: Lightweight Dynamic Local
    and Global Self-Attention Networks for Image Super-Resolution"). Scores (ALiBi, biases) are
    applied to the kept pairs but do not take part in the choice. Selecting needs every q . k
    that the static part (``within``) allows: N x N alone, N x window under a local pattern
    (``TopK(8) & SlidingWindow(64, 64)``). Logits are made a chunk of rows at a time, each against
    the run of keys its rows may see, so memory stays ``chunk x run`` for the choice and ``N x k``
    for the attention. On CPU input (float32, bfloat16, float16) the native kernel makes them a
    block of rows at a time per thread, against the keys those rows may see, and selects from them
    there (``multihead.backends.native.select``): no chunk of logits in memory.
    """

    k: int

    def __post_init__(self):
        check_int("TopK.k", self.k, minimum=1)

    def resolve(self, q, k, scale, within):
        from ..backends.native.select import fused_choice, top_keys, top_keys_of_products

        batch, heads, q_len, _ = q.shape
        kv_len = k.shape[2]
        keep = min(self.k, kv_len)
        spans = None if isinstance(within, Full) else within.spans(q_len, kv_len, q.device)
        indices = torch.empty(batch, heads, q_len, keep, dtype=torch.long, device=q.device)
        valid = torch.empty(batch, heads, q_len, keep, dtype=torch.bool, device=q.device)
        if fused_choice(q, k):
            # the kernel makes the logits itself, a block of rows at a time against the keys those
            # rows may see: no chunks, no logits in memory, a head group's keys unrepeated
            start, end = (None, None) if spans is None else (spans.start, spans.end)
            screened = top_keys_of_products(q, k, keep, start, end, indices, valid)
            how = f"{self!r}: chosen by the native kernel"
            if screened.rows:
                how += (f", {screened.rows} of {batch * heads * q_len} rows ranked by {screened.by} products first, "
                        "then rescored")
            return Resolution(KeySelection(indices, valid, kv_len), how=how)
        keys = _expand_heads(k, heads)
        budget = max(1, SELECTION_CHUNK_ELEMENTS // (batch * heads))
        # one buffer for every chunk's logits: a fresh one per chunk (tens of MiB) would be mapped
        # anew by the allocator and page-fault on every first touch (2x the time)
        buffer = q.new_empty(0)
        with torch.no_grad():
            for lo, hi, k0, k1 in _selection_chunks(spans, q_len, kv_len, keep, budget):
                size = batch * heads * (hi - lo) * (k1 - k0)
                if buffer.numel() < size:
                    buffer = q.new_empty(size)
                out = buffer[:size].view(batch, heads, hi - lo, k1 - k0)
                # the scale (> 0) does not change the order, so the choice needs only q . k
                logits = torch.matmul(q[:, :, lo:hi], keys[:, :, k0:k1].transpose(-2, -1), out=out).float()
                if spans is not None:
                    chunk = Spans(spans.start[:, :, lo:hi] - k0, spans.end[:, :, lo:hi] - k0, k1 - k0)
                    logits.masked_fill_(~chunk.mask(), float("-inf"))
                top, ok = top_keys(logits, keep)  # ascending positions in the chunk's run
                indices[:, :, lo:hi] = top + k0
                valid[:, :, lo:hi] = ok
        return Resolution(KeySelection(indices, valid, kv_len),
                          how=f"{self!r}: chosen by torch.matmul and a selection, a chunk of rows at a time")


def _selection_chunks(spans: Spans | None, q_len: int, kv_len: int, keep: int, budget: int):
    """``(lo, hi, k0, k1)``: consecutive chunks of query rows ``[lo, hi)``, each with the run of keys
    ``[k0, k1)`` that its rows may see (at least ``keep`` keys), of at most ``budget`` (rows x run)
    logits, one row at least. A chunk also stops growing once its run is 1.5x the widest reach of
    one of its rows (a sliding window's chunks then read about 1.5x the keys each row needs)."""
    if spans is None:
        first, last = [0] * q_len, [kv_len] * q_len
    else:  # the first and last allowed key of each row, over batch elements, heads and intervals
        ok = spans.end > spans.start
        first = torch.where(ok, spans.start, kv_len).amin(-1).flatten(0, 1).amin(0).tolist()
        last = torch.where(ok, spans.end, 0).amax(-1).flatten(0, 1).amax(0).tolist()
    step = max(1, min(16, budget // kv_len))
    lo = 0
    reach = [b - a for a, b in zip(first, last)]
    while lo < q_len:
        hi, k0, k1, widest = lo, kv_len, 0, 0
        while hi < q_len:
            nxt = min(q_len, hi + step)
            n0, n1 = min(k0, *first[hi:nxt]), max(k1, *last[hi:nxt])
            w = max(widest, *reach[hi:nxt])
            if hi > lo and ((nxt - lo) * max(keep, n1 - n0) > budget or n1 - n0 > 1.5 * w):
                break
            hi, k0, k1, widest = nxt, n0, n1, w
        width = max(keep, k1 - k0)
        k0 = max(0, min(k0, kv_len - width))
        yield lo, hi, k0, k0 + width
        lo = hi


# -- routing --------------------------------------------------------------------------------------


def _unit(x: Tensor, out: Tensor | None = None) -> Tensor:
    """``F.normalize(x, dim=-1)`` (the same values), dividing by the norms as a broadcast: 6x faster
    on CPU than ``F.normalize``'s expanded divisor."""
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
    return torch.div(x, norms, out=out) if out is not None else x / norms


def _routing_points(q: Tensor, k: Tensor) -> Tensor:
    """Routing's token vectors ``(B, H, N, D)``, float32, in a kept buffer (no fresh pages to fault
    in): each token's unit query plus its key head's unit key, normalised. The native kernel makes
    them in one pass over q and k on CPU (``routing_points``); elsewhere torch's norms and divisions."""
    from ..backends.native import cluster, empty

    module = cluster.kernel() if q.device.type == "cpu" else None
    if module is not None:
        out = empty(q.shape, torch.float32, q.device)
        module.routing_points(q, k, out)
        return out

    def unit(x):  # in float32, in a kept buffer (bf16 converted into it, not into a fresh one)
        out = empty(x.shape, torch.float32, x.device)
        return _unit(x if x.dtype == torch.float32 else out.copy_(x), out=out)

    batch, heads, n, dim = q.shape
    tokens = unit(q)
    tokens.view(batch, k.shape[1], heads // k.shape[1], n, dim).add_(unit(k).unsqueeze(2))
    return _unit(tokens, out=tokens)


def spherical_kmeans(points: Tensor, init: Tensor, iterations: int) -> Tensor:
    """Centroids ``(B, H, C, D)`` of unit-normalised ``points`` ``(B, H, N, D)`` after ``iterations``
    of assign-to-nearest (by cosine) and re-average; an empty cluster keeps its centroid."""
    from ..backends.native.cluster import assign_and_sum  # the kernel's, where it runs

    centroids = _unit(init)
    for _ in range(iterations):
        _, sums, counts = assign_and_sum(points, centroids)
        centroids = torch.where(counts.unsqueeze(-1) > 0, _unit(sums), centroids)
    return centroids


@dataclass(frozen=True, eq=False)
class ClusterPattern(Pattern):
    """Static pattern of a routing. Tokens are visited sorted by cluster (and by position inside a
    cluster): ``order[b, h, p]`` is the original token at frame position ``p``. A token sees the
    tokens of its own cluster that ``within`` allows at their original positions."""

    order: Tensor = field(repr=False)    # (B, H, L)
    cluster: Tensor = field(repr=False)  # cluster of each original token (B, H, L)
    clusters: int
    within: Pattern

    @property
    def batch_size(self):
        return self.order.shape[0]

    @property
    def num_heads(self):
        return self.order.shape[1]

    def __repr__(self):
        return f"ClusterPattern(clusters={self.clusters}, within={self.within!r})"

    def check(self, q_len, kv_len):
        n = self.order.shape[2]
        if q_len != n or kv_len != n:
            raise PatternError(f"{self!r} was made for {n} tokens, not q_len={q_len}, kv_len={kv_len}")
        self.within.check(q_len, kv_len)

    def __post_init__(self):
        # the cluster of the token at each frame position: one lookup per index in mask_mod
        object.__setattr__(self, "_frame_cluster", self.cluster.gather(2, self.order))

    def frame_runs(self) -> tuple[Tensor, bool] | None:
        """The clusters as consecutive runs of the frame, each a dense block of its own: their
        lengths ``(B, H, clusters)`` (empty clusters give 0), and whether attention inside a run is
        causal. None unless ``within`` is ``Full`` or ``Causal``: the frame keeps a cluster's
        tokens in original order, so only then is a run plain (or causal) attention."""
        if not isinstance(self.within, (Full, Causal)):
            return None
        batch, heads, _ = self.cluster.shape
        offsets = torch.arange(batch * heads, device=self.cluster.device).view(batch, heads, 1) * self.clusters
        counts = torch.bincount((self.cluster + offsets).flatten(), minlength=batch * heads * self.clusters)
        return counts.view(batch, heads, self.clusters), isinstance(self.within, Causal)

    def mask_mod(self, b, h, q_idx, kv_idx):
        same = self._frame_cluster[b, h, q_idx] == self._frame_cluster[b, h, kv_idx]
        if isinstance(self.within, Full):
            return same
        i, j = self.order[b, h, q_idx], self.order[b, h, kv_idx]
        return same & self.within.mask_mod(b, h, i, j)

    def _spans(self, q_pos, kv_len):
        batch, heads, n = self.order.shape
        within = self.within._spans(torch.arange(n, device=q_pos.device), kv_len)
        shape = (batch, heads, n, within.start.shape[-1])
        rows = self.order.unsqueeze(-1).expand(shape)
        start = within.start.expand(shape).gather(2, rows)  # allowed original keys of each row
        end = within.end.expand(shape).gather(2, rows)
        # Frame keys are sorted by (cluster, position): a cluster's keys in [s, e) are one run.
        frame_keys = self.cluster.gather(2, self.order) * n + self.order
        base = (self.cluster.gather(2, self.order) * n).unsqueeze(-1)
        lo = torch.searchsorted(frame_keys, (base + start).flatten(2)).view(shape)
        hi = torch.searchsorted(frame_keys, (base + end).flatten(2)).view(shape)
        return Spans(lo, hi, kv_len)


@dataclass(frozen=True)
class Routing(DynamicPattern):
    """Content-based routing: tokens go to the nearest of ``clusters`` centroids and attend within
    their cluster (Roy et al., 2020, "Efficient Content-Based Sparse Attention with Routing
    Transformers", arXiv 2003.05997).

    As in the paper, where queries and keys share one projection, a token's query and key fall in
    the same cluster: token i goes to the centroid nearest ``normalize(q_i) + normalize(k_i)``, so
    every token sees at least itself (under any ``within`` that allows the diagonal). Centroids come
    from ``iterations`` of spherical k-means on those token vectors of each (batch, head), started
    from tokens at evenly spaced positions: deterministic and stateless (the paper keeps centroids
    as an exponential moving average across steps; pass your own as ``centroids`` ``(heads,
    clusters, head_dim)`` with ``iterations=0`` for that). Self-attention only
    (``q_len == kv_len``). Tokens are visited sorted by cluster, so a query block meets about one
    cluster's keys: work and memory about ``N x N / clusters``.
    """

    clusters: int
    iterations: int = 3
    centroids: Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        check_int("Routing.clusters", self.clusters, minimum=1)
        check_int("Routing.iterations", self.iterations, minimum=0)

    def resolve(self, q, k, scale, within):
        batch, heads, n, dim = q.shape
        if k.shape[2] != n:
            raise PatternError(f"Routing is for self-attention: q_len ({n}) must equal kv_len ({k.shape[2]})")
        if self.clusters > n:
            raise PatternError(f"Routing.clusters ({self.clusters}) exceeds the {n} tokens; use fewer clusters")
        with torch.no_grad():
            from ..backends.native.cluster import native_assignment, nearest_centroids

            tokens = _routing_points(q, k)
            if self.centroids is not None:
                init = self.centroids.to(tokens).expand(batch, heads, self.clusters, dim)
            else:
                seeds = torch.linspace(0, n - 1, self.clusters, device=q.device).round().long()
                init = tokens[:, :, seeds]
            centroids = spherical_kmeans(tokens, init, self.iterations)
            cluster = nearest_centroids(tokens, centroids)
            order = torch.sort(cluster, dim=-1, stable=True).indices
        by = "the native kernel" if native_assignment(tokens, centroids) else "torch.matmul and argmax"
        how = f"{self!r}: tokens assigned to their nearest centroids by {by}"
        return Resolution(ClusterPattern(order, cluster, self.clusters, within), order, order, how=how)


def split_dynamic(pattern: Pattern) -> tuple[DynamicPattern | None, Pattern]:
    """``(dynamic part, static rest)`` of a pattern; at most one dynamic part, only under ``&``."""
    from .base import Intersection

    if isinstance(pattern, DynamicPattern):
        return pattern, Full()
    if isinstance(pattern, Intersection):
        dynamic = [p for p in pattern.parts if isinstance(p, DynamicPattern)]
        if len(dynamic) > 1:
            raise PatternError(f"{pattern!r} intersects {len(dynamic)} dynamic patterns; use one")
        if dynamic:
            rest = [p for p in pattern.parts if p is not dynamic[0]]
            return dynamic[0], rest[0] if len(rest) == 1 else Intersection(tuple(rest))
    return None, pattern
