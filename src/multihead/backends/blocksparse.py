"""Block-sparse attention in plain torch ops: only the key blocks a pattern's block layout needs.

The queries are cut into blocks of ``q_block`` rows and the keys into blocks of ``kv_block``; the
pattern's ``block_layout`` says which key blocks every query block needs (``EMPTY`` tiles are never
touched; patterns may differ per batch element and per head). Consecutive query blocks are processed
together in *groups* of about ``group_rows`` rows, so that a group's logits stay in cache, in one of
two ways:

* **window** - the key blocks the group needs form one contiguous run, or nearly (sliding windows,
  causal, documents, prefix-LM, full): the group attends to a slice ``k[:, :, k0:k1]`` of the keys,
  a view, no copy. Only the key blocks that are not ``FULL`` for every row of the group get a mask.
* **gather** - otherwise (a window plus far-away blocks, holes, per-head layouts that disagree):
  every query block gathers exactly the key blocks it needs, padded to the longest list in its
  group; padding slots are masked out.

Two more plans build gathering groups without a block layout:

* **tiled** - a pattern on a 2-D or 3-D grid (``Neighborhood``, ``ShiftedWindow``, ``Halo``,
  ``BlockLocal``, ``Axial``, alone or intersected with others; ``Pattern.tiling_box``) is visited
  tile by tile: the queries are ordered so that each tile's are consecutive rows of a frame (a
  block; each group gathers its rows and scatters its outputs back, so the frame is never
  materialised), and a tile gathers the box of keys its queries' windows cover (per axis, the union
  of their windows).
  Row-major blocks of a 2-D grid need keys from a band of whole rows; a tile needs only its box:
  a 7 x 7 neighborhood computes about 190 pairs per query tiled against 450-670 row-major, and a
  Swin window exactly its 64 keys. Tiles follow the pattern's classes (a dilation sub-grid, a
  window), so windows are never split; the tile size minimises pairs per query, charging small
  tiles for their matrix-product overhead. Used when it computes at most ``tile_gain`` of the
  row-major plan's pairs.
* **key lists** - ``KeySelection`` (what ``TopK`` resolves to) gives each query its own keys:
  single-row blocks gather exactly those, so work and memory are ``N x k``, not ``N x N``.

A group is one batched matrix product ``(B * kv_heads, gq * rows, D) @ (.., D, keys)``: the query
heads sharing a key head (GQA / MQA) are stacked along the rows, so keys are never repeated. The
mask, from the pattern's ``mask_mod`` evaluated on the group's (query, key) indices and cached with
the plan, is an additive 0 / -inf bias copied into the product's accumulator (``baddbmm_``, which
also applies the scale); score terms are applied to the group's logits with their absolute indices
(query indices in the key frame), before the mask for non-additive scores such as softcap. The
softmax runs over the group's keys of each row, in place, in one reusable buffer. No tensor of size
``q_len x kv_len`` is ever built; peak memory is linear in the sequence for local patterns.

Backward is a ``torch.autograd.Function`` that saves q, k, v and the output only and recomputes
each group's weights (FlashAttention's scheme, with the softmax recomputed rather than a saved
log-sum-exp): ``dS = P * (dO V^T - rowsum(dO * O))``, five matrix products per group. Score terms
are re-applied inside autograd during backward, so softcap gets its derivative and learnable
scores (the ``RelativePositionBias`` table) their gradient: the Function takes the score's leaf
tensors (parameters, or plain tensor attributes) as inputs. A score depending on any other tensor
that requires grad falls back to ``backward="autograd"``: plain autograd through the same groups,
which keeps every group's weights (more memory, slower, but supports double backward). Dropout
masks are drawn per group from a seed taken from torch's global generator, so backward regenerates
the same mask and ``torch.manual_seed`` makes a call reproducible.

On CPU the tiles of a plan run in the native kernel (``backends/native``: a tile table built from
the plan, one C++ pass per tile, the weights over all of its keys at once, forward and backward)
whenever it is built and serves the request (``BlockSparseBackend.native_unsupported`` says why not); what follows is
the PyTorch path, which serves everything else (other scores, backward="autograd", CUDA).

Measured on 2 CPU threads (fp32, B=1, H=8, D=64, ``SlidingWindow(128, 128)``, N=16384; see
``benchmarks/tune_blocksparse.py``): forward 0.11 s against 4.1 s for dense SDPA (0.86x the target
of twice the attended fraction times SDPA), forward+backward 3.2-3.4x the forward; recomputing beats
plain autograd over the groups in time (0.31 s vs 0.45 s) and in memory above the inputs (134 MiB
vs 506 MiB; at N=65536, 520 MiB vs 1985 MiB). The defaults (32-row / 32-key blocks, 64-row groups)
were the fastest of a grid of block sizes 16-128 and groups of 32-256 rows at N=16384 and 65536.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..normalizers import Sigmoid, Softmax
from ..patterns import EMPTY, FULL
from ..request import Request
from . import native
from .base import Backend
from .native import tiles as native_tiles
from .native.function import native_attention, split_score

_NEG_INF = float("-inf")
#: rows per block of the native kernel's lane kernels (float32 on AVX-512; AVX2's 8 divide it)
NATIVE_LANES = 16
_MISSING = object()


# --------------------------------------------------------------------------------------------------
# Plan: how the query blocks are grouped and which keys every group reads.
# --------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Group:
    """One group of consecutive query rows ``[r0, r1)``: ``nblk`` blocks of ``rows`` rows each."""

    r0: int
    r1: int
    nblk: int
    rows: int
    gather: bool
    # window mode: the key slice and the column runs (relative to k0) that need a mask
    k0: int = 0
    k1: int = 0
    runs: tuple = ()
    # gather mode: key positions (B'', H'', nblk, width) clamped into range, and validity
    kpos: Tensor | None = None
    valid: Tensor | None = None
    need_mask: bool = False
    exact: bool = False  # the valid slots are exactly the allowed keys: no mask_mod needed
    # masks (float bias or boolean), per (key heads, query heads per key head)
    bias_cache: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.kpos.shape[-1] if self.gather else self.k1 - self.k0


@dataclass(eq=False)
class _Plan:
    groups: list
    lb: int  # layout batch extent B'' (1 or B)
    lh: int  # layout head extent H'' (1 or H)
    q_block: int
    kv_block: int
    mask_bytes: int = 0  # bytes of cached masks
    pairs: int = 0  # computed (query, key) pairs per (batch, head), padding included
    #: The original query at each row of the frame the groups walk (None: the identity). A tiled
    #: plan visits a grid tile by tile, so that each group's rows are one tile; each group gathers
    #: its rows and scatters its outputs (no permuted copy of q or of the output).
    q_order: Tensor | None = None
    #: The native kernel's tile table of this plan (``native.tiles.TileTable``), when built for it.
    table: object = None


def _runs_of(flags: list) -> list:
    """Maximal runs ``(start, end)`` of True in a list of bools."""
    runs, start = [], None
    for i, f in enumerate(flags):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(flags)))
    return runs


def _build_plan(pattern, q_len: int, kv_len: int, device, *, q_block: int,
                kv_block: int, group_rows: int, max_group_elems: int, window_slack: float,
                elems_per_row: int) -> _Plan:
    """Group the query blocks and decide, per group, the keys it reads (see the module doc)."""
    layout = pattern.block_layout(q_len, kv_len, q_block, kv_block, device=device)
    state = layout.state.cpu()
    lb, lh, nq, nk = state.shape
    needed = state != EMPTY
    count = needed.sum(-1)  # (lb, lh, nq)
    width = max(int(count.max()), 1)
    # kv_blocks(): ascending indices of needed key blocks, padded with 0
    order = torch.sort(needed.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    slot_ok = torch.arange(width) < count.unsqueeze(-1)
    idx = torch.where(slot_ok, order, torch.zeros_like(order))
    slot_full = (state.gather(-1, idx) == FULL) & slot_ok
    # hull of needed key blocks per query block, over all (b, h)
    lo = torch.where(slot_ok, idx, torch.full_like(idx, nk)).amin(-1).flatten(0, 1).amin(0)
    hi = (torch.where(slot_ok, idx, torch.full_like(idx, -1)).amax(-1).flatten(0, 1).amax(0) + 1)
    wmax = count.flatten(0, 1).amax(0)  # (nq,)
    full_all = (state == FULL).flatten(0, 1).all(0)  # (nq, nk): full for every (b, h)
    lo_l, hi_l, w_l = lo.tolist(), hi.tolist(), wmax.tolist()
    short_last_key = kv_len % kv_block != 0
    last_rows = q_len - (nq - 1) * q_block

    def rows_of(qb):
        return q_block if qb < nq - 1 else last_rows

    def keys(b0, b1):  # keys in key blocks [b0, b1)
        return min(b1 * kv_block, kv_len) - b0 * kv_block

    # window mode when the hull holds few more keys than the densest (b, h) needs
    use_window = [keys(lo_l[i], hi_l[i]) <= (1.0 + window_slack) * min(w_l[i] * kv_block, kv_len)
                  for i in range(nq)]
    groups = []
    pairs = 0
    per_bh_layout = lb > 1 or lh > 1
    qb = 0
    while qb < nq:
        start = qb
        if use_window[qb]:
            g_lo, g_hi = lo_l[qb], hi_l[qb]
            qb += 1
            while qb < nq and use_window[qb] and (qb - start) * q_block < group_rows:
                n_lo, n_hi = min(g_lo, lo_l[qb]), max(g_hi, hi_l[qb])
                rows = min((qb + 1) * q_block, q_len) - start * q_block
                if rows * keys(n_lo, n_hi) * elems_per_row > max_group_elems:
                    break
                g_lo, g_hi = n_lo, n_hi
                qb += 1
            r0, r1 = start * q_block, min(qb * q_block, q_len)
            k0, k1 = g_lo * kv_block, min(g_hi * kv_block, kv_len)
            ok = full_all[start:qb, g_lo:g_hi].all(0).tolist()
            runs = tuple((a * kv_block, min((g_lo + b) * kv_block, kv_len) - k0)
                         for a, b in _runs_of([not f for f in ok]))
            groups.append(_Group(r0, r1, 1, r1 - r0, False, k0=k0, k1=k1, runs=runs))
            pairs += (r1 - r0) * (k1 - k0)
            continue
        # gather mode: full-size blocks together, a short last block on its own
        w = w_l[qb]
        qb += 1
        if rows_of(start) == q_block:
            while (qb < nq and not use_window[qb] and rows_of(qb) == q_block
                   and (qb - start) * q_block < group_rows):
                nw = max(w, w_l[qb])
                if (qb + 1 - start) * q_block * nw * kv_block * elems_per_row > max_group_elems:
                    break
                w = nw
                qb += 1
        sl = slice(start, qb)
        g_idx, g_ok, g_full = idx[:, :, sl, :w], slot_ok[:, :, sl, :w], slot_full[:, :, sl, :w]
        kpos = (g_idx.unsqueeze(-1) * kv_block + torch.arange(kv_block)).flatten(-2)
        valid = g_ok.unsqueeze(-1).expand(*g_ok.shape, kv_block).flatten(-2) & (kpos < kv_len)
        need_mask = not bool(g_full.all()) or (short_last_key and bool((g_idx == nk - 1).any()))
        if per_bh_layout:  # drop the batch / head axes along which the group's keys agree
            if kpos.shape[0] > 1 and bool((kpos == kpos[:1]).all() and (valid == valid[:1]).all()):
                kpos, valid = kpos[:1], valid[:1]
            if kpos.shape[1] > 1 and bool((kpos == kpos[:, :1]).all() and (valid == valid[:, :1]).all()):
                kpos, valid = kpos[:, :1], valid[:, :1]
        r0, r1 = start * q_block, min(qb * q_block, q_len)
        kpos = kpos.clamp(max=kv_len - 1).contiguous()
        groups.append(_Group(r0, r1, qb - start, rows_of(start) if qb - start == 1 else q_block, True,
                             kpos=kpos.to(device), valid=valid.contiguous().to(device),
                             need_mask=need_mask))
        pairs += (r1 - r0) * kpos.shape[-1]
    return _Plan(groups, lb, lh, q_block, kv_block, pairs=pairs)


def _key_list_plan(indices: Tensor, valid: Tensor, device, *, group_rows: int,
                   max_group_elems: int, elems_per_row: int) -> _Plan:
    """Groups of single query rows, each gathering exactly its listed keys (``KeySelection``)."""
    lb, lh, q_len, width = indices.shape
    rows = max(1, min(group_rows, max_group_elems // max(1, width * elems_per_row)))
    indices, valid = indices.to(device), valid.to(device)
    groups = []
    for r0 in range(0, q_len, rows):
        r1 = min(q_len, r0 + rows)
        ok = valid[:, :, r0:r1].contiguous()
        groups.append(_Group(r0, r1, r1 - r0, 1, True, kpos=indices[:, :, r0:r1].contiguous(), valid=ok,
                             need_mask=not bool(ok.all()), exact=True))
    return _Plan(groups, lb, lh, 1, width, pairs=q_len * width)


def _axis_tiles(box, axis: int, tile: int):
    """One grid axis cut into query segments of at most ``tile`` coordinates of one class, and for
    each the key coordinates its queries may see and whether they all see all of them."""
    n = box.grid[axis]
    x = torch.arange(n)
    r = box.axis_range(axis, x)
    rel = x[None, :] - r.start[:, None]
    allowed = (rel >= 0) & (rel % r.step == 0) & (rel < (r.count * r.step)[:, None])
    cls = box.axis_class(axis, x).tolist()
    segments: list[list[int]] = []
    for c in sorted(range(n), key=lambda c: (cls[c], c)):
        if segments and cls[segments[-1][-1]] == cls[c] and len(segments[-1]) < tile:
            segments[-1].append(c)
        else:
            segments.append([c])
    keys, full = [], []
    for seg in segments:
        rows = allowed[seg]
        cols = rows.any(0).nonzero().flatten()
        keys.append(cols)
        full.append(bool(rows[:, cols].all()))
    return segments, keys, full


def _padded(lists: list, width: int) -> tuple[Tensor, Tensor]:
    """Lists of ints as a ``(len(lists), width)`` tensor padded with 0, and its validity."""
    values = torch.zeros(len(lists), width, dtype=torch.long)
    ok = torch.zeros(len(lists), width, dtype=torch.bool)
    for i, item in enumerate(lists):
        values[i, :len(item)] = torch.as_tensor(item, dtype=torch.long)
        ok[i, :len(item)] = True
    return values, ok


def _product(per_axis: list, grid: tuple) -> tuple[Tensor, Tensor]:
    """Flat grid indices of every combination of per-axis coordinates: for per-axis padded
    ``(segments_i, width_i)`` lists, a ``(prod segments_i, prod width_i)`` tensor and validity."""
    strides = [math.prod(grid[i + 1:]) for i in range(len(grid))]
    flat = torch.zeros((), dtype=torch.long)
    ok = torch.ones((), dtype=torch.bool)
    d = len(per_axis)
    for i, ((values, valid), stride) in enumerate(zip(per_axis, strides)):
        shape = [1] * (2 * d)
        shape[i], shape[d + i] = values.shape
        flat = flat + (values * stride).view(shape)
        ok = ok & valid.view(shape)
    tiles = math.prod(v.shape[0] for v, _ in per_axis)
    return flat.reshape(tiles, -1), ok.reshape(tiles, -1)


def _choose_tile(box, target_rows: int = 64, max_excess: float | None = None,
                 max_rows: int | None = None, lanes: int = 1) -> tuple[int, ...]:
    """Per-axis tile sizes with about ``target_rows`` queries per tile (at most ``max_rows``,
    default 4x that) that compute the fewest (query, key) pairs, a small tile being charged for
    its matrix products' overhead. With ``max_excess``, only tiles computing at most that multiple
    of the needed pairs are considered (when any does). ``lanes``: the tile's rows are computed in
    blocks of that many (the native kernel's vector lanes), so each tile is charged for its rows
    rounded up to a whole block: 24 rows cost 32, and a tile of fewer than 8 (which the kernel runs a
    row at a time, at under half the lanes' rate per pair) costs 16."""
    max_rows = max_rows or 4 * target_rows
    grid = box.grid
    odd = {3, 6} if max_excess is not None else set()  # finer choices for the native kernel
    options = [sorted({min(2 ** e, n) for e in range(n.bit_length() + 1)} | {min(o, n) for o in odd})
               for n in grid]
    per_query, per_tile = [{} for _ in grid], [{} for _ in grid]  # keys per query, rows per tile
    sizes = [{} for _ in grid]  # per axis and size: each segment's rows and keys
    for i, n in enumerate(grid):
        for t in options[i]:
            segments, keys, _ = _axis_tiles(box, i, t)
            rows, width = (torch.tensor([len(x) for x in xs], dtype=torch.float64) for xs in (segments, keys))
            sizes[i][t] = rows, width
            per_query[i][t] = float((rows * width).sum()) / n
            per_tile[i][t] = n / len(segments)
    needed = math.prod(per_query[i][1] for i in range(len(grid)))  # one query per tile: its own keys
    best, best_cost = None, math.inf
    for strict in ((True, False) if max_excess is not None else (False,)):
        for tile in itertools.product(*options):
            rows = math.prod(per_tile[i][t] for i, t in enumerate(tile))
            if rows > max_rows:
                continue
            keys = math.prod(per_query[i][t] for i, t in enumerate(tile))
            if strict and keys > max_excess * needed:
                continue
            cost = keys * _lane_excess([sizes[i][t] for i, t in enumerate(tile)], lanes) * (1 + target_rows / rows)
            if cost < best_cost:
                best, best_cost = tile, cost
        if best is not None:
            break
    return best


def _lane_excess(axis_sizes: list, lanes: int) -> float:
    """Pairs computed on ``lanes``-row blocks over pairs computed, for the tiles that combine one
    segment per axis (``axis_sizes``: per axis, its segments' rows and keys): a tile's rows are
    rounded up to whole blocks, tile by tile (a grid's edge tiles are smaller)."""
    if lanes == 1:
        return 1.0
    rows, keys = torch.ones(()), torch.ones(())
    for seg_rows, seg_keys in axis_sizes:  # outer products: every tile of the grid
        rows, keys = rows.unsqueeze(-1) * seg_rows, keys.unsqueeze(-1) * seg_keys
    return float(((rows / lanes).ceil() * lanes * keys).sum() / (rows * keys).sum())


def _tiled_plan(pattern, box, device, *, tile: tuple[int, ...], group_rows: int,
                max_group_elems: int, elems_per_row: int) -> _Plan:
    """Visit the grid tile by tile: each tile's queries are consecutive rows of the frame and
    gather the box of keys they may see (the per-axis union of their windows). Tiles of one size
    are grouped; masks come from ``pattern.mask_mod`` where a tile's box holds disallowed pairs."""
    grid = box.grid
    axes = [_axis_tiles(box, i, t) for i, t in enumerate(tile)]
    q_flat, q_ok = _product([_padded(segs, max(map(len, segs))) for segs, _, _ in axes], grid)
    k_flat, k_ok = _product([_padded([k.tolist() for k in keys], max(len(k) for k in keys))
                             for _, keys, _ in axes], grid)
    full = torch.ones((), dtype=torch.bool)
    for i, (_, _, f) in enumerate(axes):
        shape = [1] * len(axes)
        shape[i] = len(f)
        full = full & torch.tensor(f).view(shape)
    full = full.flatten() & (pattern is box)
    rows, width = q_ok.sum(1), k_ok.sum(1)
    # keys valid-first (ascending positions), tiles largest first (equal sizes consecutive)
    k_order = torch.sort((~k_ok).to(torch.int8), dim=1, stable=True).indices
    k_flat, k_ok = k_flat.gather(1, k_order), k_ok.gather(1, k_order)
    tiles = torch.sort(-rows, stable=True).indices.tolist()
    q_rows = [q_flat[t][q_ok[t]] for t in tiles]
    q_order = torch.cat(q_rows)
    rows_l, width_l, full_l = rows.tolist(), width.tolist(), full.tolist()
    lb, lh = pattern.batch_size or 1, pattern.num_heads or 1
    groups, pairs, r0, i = [], 0, 0, 0
    while i < len(tiles):
        j, w = i + 1, width_l[tiles[i]]
        size = rows_l[tiles[i]]
        while j < len(tiles) and rows_l[tiles[j]] == size and (j + 1 - i) * size <= group_rows:
            nw = max(w, width_l[tiles[j]])
            if (j + 1 - i) * size * nw * elems_per_row > max_group_elems:
                break
            w, j = nw, j + 1
        members = tiles[i:j]
        kpos = k_flat[members, :w].view(1, 1, len(members), w)
        valid = k_ok[members, :w].view(1, 1, len(members), w)
        need_mask = not (bool(valid.all()) and all(full_l[t] for t in members))
        r1 = r0 + size * len(members)
        groups.append(_Group(r0, r1, len(members), size, True, kpos=kpos.contiguous().to(device),
                             valid=valid.contiguous().to(device), need_mask=need_mask))
        pairs += (r1 - r0) * w
        r0, i = r1, j
    return _Plan(groups, lb, lh, math.prod(tile), 0, pairs=pairs, q_order=q_order.to(device))


# --------------------------------------------------------------------------------------------------
# The per-group computation shared by forward and backward.
# --------------------------------------------------------------------------------------------------

class _Workspace:
    """Reusable scratch buffers, so the group loop does not allocate (and page-fault) per group."""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.bufs, self.views = dtype, device, {}, {}

    def get(self, name: str, shape, dtype=None) -> Tensor:
        dtype = dtype or self.dtype
        shape = tuple(shape)
        view = self.views.get((name, dtype, shape))
        if view is not None:
            return view
        n = math.prod(shape)
        buf = self.bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=self.device)
            self.bufs[(name, dtype)] = buf
            self.views = {k: v for k, v in self.views.items() if k[:2] != (name, dtype)}
        view = self.views[(name, dtype, shape)] = buf[:n].view(shape)
        return view


class _Flat:
    """A (batch, heads, tokens, E) tensor with its views as (batch * heads, tokens, E) and
    (batch * key heads, query heads per key head, tokens, E)."""

    __slots__ = ("t", "e", "rows3", "rows4")

    def __init__(self, t: Tensor, groups: int = 1):
        self.t, self.e = t, t.shape[-1]
        self.rows3 = t.view(-1, t.shape[2], self.e)
        self.rows4 = t.view(-1, groups, t.shape[2], self.e)


class _Call:
    """Everything about one attention call that the group loops need."""

    def __init__(self, req: Request, plan: _Plan, compute: torch.dtype, mask_cache_bytes: int):
        self.pattern, self.score, self.scale, self.p = req.pattern, req.score, req.scale, req.dropout
        self.normalizer = req.normalizer
        self.B, self.H, self.Hkv = req.batch, req.heads, req.kv_heads
        self.groups = req.heads // req.kv_heads
        self.Lq, self.Lk = req.q_len, req.kv_len
        self.offset = req.kv_len - req.q_len
        self.device, self.compute = req.device, compute
        self.plan = plan
        #: The groups to compute: a window group whose rows see no key at all (possible when the
        #: normalizer allows empty rows, as sigmoid does) has nothing to compute; its rows stay 0.
        self.work = [g for g in plan.groups if g.width > 0]
        self.skips_rows = len(self.work) < len(plan.groups)
        self.mask_cache_bytes = mask_cache_bytes
        self.seed = None
        self.leaf_homes: list = []  # where the score keeps the leaves given to the Function
        self.b_all = torch.arange(self.B, device=self.device)
        self.h_all = torch.arange(self.H, device=self.device)

    # -- geometry -----------------------------------------------------------------------------
    def heads_of(self, g: _Group) -> tuple[int, int]:
        """(key heads, query heads per key head) of the group's logits.

        Query heads sharing a key head are stacked along the rows of one matrix product, unless
        the group gathers different keys for each query head."""
        if g.gather and g.kpos.shape[1] > 1 and self.groups > 1:
            return self.H, 1
        return self.Hkv, self.groups

    def shape6(self, g: _Group, hk: int, gq: int) -> tuple:
        return (self.B, hk, g.nblk, gq, g.rows, g.width)

    def rows_in(self, x: "_Flat", g: _Group, hk: int, gq: int) -> Tensor:
        """Rows of ``x`` (B, H, Lq, E) in the group as (B * hk * nblk, gq * rows, E); under a
        query order (tiled plans) the group's rows are gathered from where they lie."""
        e = x.e
        order = self.rows_of(g)
        if order is None and g.nblk == 1 and gq == 1:  # a view
            return x.rows3[:, g.r0:g.r1]
        if order is None and g.nblk == 1:  # query heads sharing a key head stacked: one copy
            return x.rows4[:, :, g.r0:g.r1].reshape(-1, gq * g.rows, e)
        xs = x.t[:, :, g.r0:g.r1] if order is None else x.t.index_select(2, order)
        xs = xs.view(self.B, hk, gq, g.nblk, g.rows, e)
        return xs.permute(0, 1, 3, 2, 4, 5).reshape(-1, gq * g.rows, e)  # a view when gq == 1 and gathered

    def rows_out(self, dst: "_Flat", val: Tensor, g: _Group, hk: int, gq: int) -> None:
        """Write ``val`` (B * hk * nblk, gq * rows, E) into the group's rows of ``dst``."""
        e = dst.e
        order = self.rows_of(g)
        if order is not None:
            rows = val.view(self.B, hk, g.nblk, gq, g.rows, e).permute(0, 1, 3, 2, 4, 5)
            dst.t.index_copy_(2, order, rows.reshape(self.B, self.H, g.r1 - g.r0, e))
        elif g.nblk == 1 and gq == 1:
            dst.rows3[:, g.r0:g.r1].copy_(val)
        elif g.nblk == 1:
            dst.rows4[:, :, g.r0:g.r1].copy_(val.reshape(-1, gq, g.rows, e))
        else:
            d = dst.t[:, :, g.r0:g.r1].view(self.B, hk, gq, g.nblk, g.rows, e)
            d.copy_(val.reshape(self.B, hk, g.nblk, gq, g.rows, e).permute(0, 1, 3, 2, 4, 5))

    def rows_of(self, g: _Group) -> Tensor | None:
        """The original query rows of the group's frame rows ``[r0, r1)`` (None: the same)."""
        order = self.plan.q_order
        return None if order is None else order[g.r0:g.r1]

    def keys_in(self, x: "_Flat", g: _Group, hk: int, ws: "_Workspace | None" = None,
                name: str = "") -> Tensor:
        """The group's keys (or values) of ``x`` (B, Hkv, Lk, E) as (B * hk * nblk, width, E)."""
        if not g.gather:  # a view
            return x.rows3[:, g.k0:g.k1]
        e = x.e
        if g.kpos.shape[0] == 1 and g.kpos.shape[1] == 1:
            idx = g.kpos.view(-1)
            if ws is None:
                return x.t.index_select(2, idx).view(-1, g.width, e)
            buf = ws.get(name, (self.B, self.Hkv, idx.numel(), e), x.t.dtype)
            return torch.index_select(x.t, 2, idx, out=buf).view(-1, g.width, e)
        rows = self._key_rows(g, hk)
        if ws is None:
            return x.t.view(-1, e).index_select(0, rows).view(-1, g.width, e)
        buf = ws.get(name, (rows.numel(), e), x.t.dtype)
        return torch.index_select(x.t.view(-1, e), 0, rows, out=buf).view(-1, g.width, e)

    def _key_rows(self, g: _Group, hk: int) -> Tensor:
        """The group's keys as rows of the (B * Hkv * Lk, E) view, ``(B * hk * nblk * width,)``: one
        row index per (batch, head, key), so that gathers and adds run along dim 0, their fast path
        (advanced indexing or index_add_ along dim 2 of the 4-D tensor go one small slice at a
        time: 6x slower on top-k's lists). Made afresh: it is 1/E of the data it gathers."""
        bi = self.b_all.view(-1, 1, 1, 1)
        hi = (torch.arange(hk, device=self.device) // (hk // self.Hkv)).view(1, -1, 1, 1)
        lin = (bi * self.Hkv + hi) * self.Lk + g.kpos  # (B, hk, nblk, width)
        return lin.expand(self.B, hk, *g.kpos.shape[2:]).reshape(-1)

    def keys_add(self, dst: "_Flat", val: Tensor, g: _Group, hk: int) -> None:
        """Accumulate ``val`` (B * hk * nblk, width, E) into ``dst`` (B, Hkv, Lk, E)."""
        if not g.gather:
            dst.rows3[:, g.k0:g.k1].add_(val)
            return
        dst.t.view(-1, dst.e).index_add_(0, self._key_rows(g, hk), val.reshape(-1, dst.e))

    def keys_mm(self, dst: "_Flat", a: Tensor, b: Tensor, g: _Group, hk: int, ws: "_Workspace",
                alpha: float) -> None:
        """Accumulate ``alpha * a @ b`` (B * hk * nblk, width, E) into ``dst`` (B, Hkv, Lk, E)."""
        # (baddbmm_ straight into a strided key slice falls back to one matrix product per batch)
        val = ws.get("keys", (a.shape[0], a.shape[1], b.shape[2]))
        self.keys_add(dst, val.baddbmm_(a, b, beta=0.0, alpha=alpha), g, hk)

    # -- indices for scores and masks (6-D: batch, key head, block, head in group, row, key) ----
    def q_index(self, g: _Group) -> Tensor:
        order = self.rows_of(g)
        pos = torch.arange(g.r0, g.r1, device=self.device) if order is None else order
        return (pos + self.offset).view(1, 1, g.nblk, 1, g.rows, 1)  # in the key frame

    def kv_index(self, g: _Group, c0: int = 0, c1: int | None = None) -> Tensor:
        if not g.gather:
            c1 = g.width if c1 is None else c1
            return torch.arange(g.k0 + c0, g.k0 + c1, device=self.device).view(1, 1, 1, 1, 1, -1)
        kp = g.kpos
        return kp.view(kp.shape[0], kp.shape[1], g.nblk, 1, 1, kp.shape[-1])

    def apply_score(self, s: Tensor, g: _Group, hk: int, gq: int) -> Tensor:
        b = self.b_all.view(-1, 1, 1, 1, 1, 1)
        h = self.h_all.view(1, hk, 1, gq, 1, 1)
        s6 = s.view(self.shape6(g, hk, gq))
        return self.score(s6, b, h, self.q_index(g), self.kv_index(g)).reshape(s.shape)

    def _drops(self, g: _Group, hk: int, gq: int) -> list:
        """``(c0, c1, drop)``: boolean masks (True = masked out) of the group's key columns."""
        plan = self.plan
        qi = self.q_index(g)
        b = torch.arange(plan.lb, device=self.device).view(-1, 1, 1, 1, 1, 1)
        h = (torch.zeros(1, 1, 1, 1, 1, 1, dtype=torch.long, device=self.device) if plan.lh == 1
             else self.h_all.view(1, hk, 1, gq, 1, 1))
        if not g.gather:
            return [(c0, c1, ~self.pattern.mask_mod(b, h, qi, self.kv_index(g, c0, c1)))
                    for c0, c1 in g.runs]
        if not g.need_mask:
            return []
        valid = g.valid.view(g.valid.shape[0], g.valid.shape[1], g.nblk, 1, 1, -1)
        if g.exact:
            return [(0, g.width, ~valid)]
        allowed = self.pattern.mask_mod(b, h, qi, self.kv_index(g))
        return [(0, g.width, ~(allowed & valid))]

    def bias(self, g: _Group, hk: int, gq: int, ws: _Workspace) -> Tensor | None:
        """The group's mask as an additive bias (0 or -inf) broadcasting to its 6-D logits; None
        when nothing needs a mask. Kept with the plan as a float bias while within
        ``mask_cache_bytes``, then as the (smaller) boolean masks, then recomputed."""
        key = (hk, gq)
        cached = g.bias_cache.get(key, _MISSING)
        if cached is None or isinstance(cached, Tensor):  # no mask, or a float bias
            return cached if cached is None or cached.dtype == self.compute else cached.to(self.compute)
        drops = cached if isinstance(cached, list) else self._drops(g, hk, gq)
        if not drops:
            g.bias_cache[key] = None
            return None
        shape = torch.broadcast_shapes(*(d.shape[:-1] + (g.width,) for _, _, d in drops),
                                       (1, 1, g.nblk, 1, g.rows, g.width))
        plan = self.plan
        fbytes = math.prod(shape) * torch.empty((), dtype=self.compute).element_size()
        keep = cached is _MISSING and plan.mask_bytes + fbytes <= self.mask_cache_bytes
        bias = (torch.zeros(shape, dtype=self.compute, device=self.device) if keep
                else ws.get("bias", shape).zero_())
        for c0, c1, drop in drops:
            bias[..., c0:c1].masked_fill_(drop, _NEG_INF)
        if keep:
            plan.mask_bytes += fbytes
            g.bias_cache[key] = bias
        elif cached is _MISSING:
            bbytes = sum(d.numel() for _, _, d in drops)
            if plan.mask_bytes + bbytes <= self.mask_cache_bytes:
                plan.mask_bytes += bbytes
                g.bias_cache[key] = drops
        return bias

    # -- logits ---------------------------------------------------------------------------------
    def logits(self, qg: Tensor, kg: Tensor, g: _Group, hk: int, gq: int, ws: _Workspace,
               mode: str = "buffer"):
        """Masked, scored logits ``(B * hk * nblk, gq * rows, width)`` of the group.

        ``mode``: ``"buffer"`` writes into the workspace (no autograd; the result may be
        overwritten in place); ``"autograd"`` builds them out of place for plain autograd;
        ``"track"`` (backward of a learnable or non-additive score) also returns
        ``(raw, scored)``, the score's input and output inside autograd for ``autograd.grad``.
        """
        bias = self.bias(g, hk, gq, ws)
        score = self.score
        shape6 = self.shape6(g, hk, gq)
        shape3 = (qg.shape[0], qg.shape[1], kg.shape[1])
        early = bias is not None and (score is None or score.additive)  # mask in the accumulator
        kt = kg.transpose(-2, -1)
        if mode == "autograd":
            if early:
                s = torch.baddbmm(bias.expand(shape6).reshape(shape3), qg, kt, alpha=self.scale)
            else:
                s = torch.bmm(qg, kt) * self.scale
        else:
            s = torch.empty(shape6, dtype=qg.dtype, device=qg.device) if mode == "track" \
                else ws.get("s", shape6)
            if early:
                s.copy_(bias.expand(shape6))
            s = s.view(shape3).baddbmm_(qg, kt, beta=1.0 if early else 0.0, alpha=self.scale)
        raw = scored = None
        if score is not None:
            if mode == "track":
                with torch.enable_grad():
                    raw = s.requires_grad_() if not score.additive else s
                    scored = self.apply_score(raw, g, hk, gq)
                s = scored.detach()
            else:
                s = self.apply_score(s, g, hk, gq)
            if bias is not None and not early:
                s = (s.view(shape6) + bias).view(shape3)
        return (s, (raw, scored)) if mode == "track" else s

    def dropout_keep(self, shape, gi: int, ws: _Workspace) -> Tensor:
        """Group ``gi``'s dropout scale (0 or 1 / (1 - p)), regenerated identically in backward."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed + gi)
        keep = ws.get("keep", shape).bernoulli_(1.0 - self.p, generator=gen)
        return keep.mul_(1.0 / (1.0 - self.p))


def _forward_groups(call: _Call, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Forward over all groups, without autograd."""
    out = (q.new_zeros if call.skips_rows else q.new_empty)(call.B, call.H, call.Lq, v.shape[-1])
    ws = _Workspace(q.dtype, q.device)
    q, k, v, outf = _Flat(q, call.groups), _Flat(k), _Flat(v), _Flat(out, call.groups)
    for gi, g in enumerate(call.work):
        hk, gq = call.heads_of(g)
        qg = call.rows_in(q, g, hk, gq)
        kg, vg = call.keys_in(k, g, hk, ws, "k"), call.keys_in(v, g, hk, ws, "v")
        s = call.logits(qg, kg, g, hk, gq, ws)
        p = call.normalizer.weights_(s, call.Lk)
        if call.p > 0:
            p.mul_(call.dropout_keep(p.shape, gi, ws))
        o = torch.bmm(p, vg, out=ws.get("o", (p.shape[0], p.shape[1], vg.shape[-1])))
        call.rows_out(outf, o, g, hk, gq)
    return out


class _GroupPieces(torch.autograd.Function):
    """The per-group pieces of q (rows) or of k / v (key windows or gathered blocks), as one op.

    Slicing a tensor once per group under plain autograd would give every slice a backward that
    builds a gradient of the full tensor's size (quadratic work); here backward accumulates all
    the pieces' gradients into one tensor. The backward is itself differentiable.
    """

    @staticmethod
    def forward(ctx, call: _Call, kind: str, x: Tensor):
        ctx.call, ctx.kind, ctx.shape = call, kind, x.shape
        flat = _Flat(x, call.groups if kind == "rows" else 1)
        pieces = []
        for g in call.work:
            hk, gq = call.heads_of(g)
            piece = call.rows_in(flat, g, hk, gq) if kind == "rows" else call.keys_in(flat, g, hk)
            pieces.append(piece.clone() if piece._base is not None else piece)
        return tuple(pieces)

    @staticmethod
    def backward(ctx, *grads):
        call = ctx.call
        acc = grads[0].new_zeros(ctx.shape)
        flat = _Flat(acc, call.groups if ctx.kind == "rows" else 1)
        for g, grad in zip(call.work, grads):
            if grad is None:
                continue
            hk, gq = call.heads_of(g)
            if ctx.kind == "rows":
                call.rows_out(flat, grad, g, hk, gq)
            else:
                call.keys_add(flat, grad, g, hk)
        return None, None, acc


def _forward_groups_autograd(call: _Call, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The same computation, differentiable by plain autograd (which keeps every group's weights)."""
    out = []
    qs = _GroupPieces.apply(call, "rows", q)
    ks, vs = _GroupPieces.apply(call, "keys", k), _GroupPieces.apply(call, "keys", v)
    for gi, (g, qg, kg, vg) in enumerate(zip(call.work, qs, ks, vs)):
        hk, gq = call.heads_of(g)
        ws = _Workspace(qg.dtype, qg.device)
        p = call.normalizer.weights(call.logits(qg, kg, g, hk, gq, ws, mode="autograd"), call.Lk)
        if call.p > 0:
            p = p * call.dropout_keep(p.shape, gi, ws)
        o = torch.bmm(p, vg).view(call.B, hk, g.nblk, gq, g.rows, -1).permute(0, 1, 3, 2, 4, 5)
        out.append(o.reshape(call.B, call.H, g.r1 - g.r0, -1))
    if call.skips_rows or call.plan.q_order is not None:  # rows elsewhere; rows of skipped groups are 0
        rows = [call.rows_of(g) for g in call.work]
        rows = torch.cat([torch.arange(g.r0, g.r1, device=q.device) if r is None else r
                          for g, r in zip(call.work, rows)])
        return q.new_zeros(call.B, call.H, call.Lq, v.shape[-1]).index_copy(2, rows, torch.cat(out, 2))
    return torch.cat(out, dim=2)


@dataclass(frozen=True)
class _LeafHome:
    """Where a score keeps one of its leaf tensors: ``module.<container>[name]``."""

    module: torch.nn.Module
    container: str  # "_parameters", "_buffers" or "__dict__"
    name: str


@contextmanager
def _rebound(homes: list, leaves: list):
    """Put ``leaves`` back where the score held them during forward, for the duration: backward
    may run after the caller swapped them out (``torch.func.functional_call`` restores the
    module's own parameters on return)."""
    saved = [getattr(h.module, h.container)[h.name] for h in homes]
    for h, t in zip(homes, leaves):
        getattr(h.module, h.container)[h.name] = t
    try:
        yield
    finally:
        for h, t in zip(homes, saved):
            getattr(h.module, h.container)[h.name] = t


def _score_leaves(score, dtype, device):
    """Tensors requiring grad that ``score`` depends on, and where it keeps them (``_LeafHome``s);
    None when they cannot all be found.

    They are the leaf tensors held by the score's modules (parameters, or plain tensor attributes);
    a probe call checks that the score's output depends on nothing else that requires grad.
    """
    if score is None:
        return [], []
    found, homes = {}, {}
    for m in score.modules():
        for container in ("_parameters", "_buffers", "__dict__"):
            for name, t in getattr(m, container).items():
                if isinstance(t, Tensor) and t.requires_grad:
                    if not t.is_leaf:
                        return None
                    found[id(t)] = t
                    homes[id(t)] = _LeafHome(m, container, name)
    z = torch.zeros(1, 1, 1, 1, 1, 1, dtype=torch.long, device=device)
    with torch.enable_grad():
        probe = score(torch.zeros(1, 1, 1, 1, 1, 1, dtype=dtype, device=device), z, z, z, z)
    if not probe.requires_grad:
        return [], []
    seen, stack = set(), [probe.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) not in found:
            return None
        stack.extend(nf for nf, _ in fn.next_functions)
    return list(found.values()), [homes[i] for i in found]


class _BlockSparseFunction(torch.autograd.Function):
    """Saves q, k, v and the output; backward recomputes every group's weights."""

    @staticmethod
    def forward(ctx, call: _Call, q, k, v, *leaves):
        out = _forward_groups(call, q, k, v)
        ctx.call = call
        ctx.save_for_backward(q, k, v, out, *leaves)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        with _rebound(ctx.call.leaf_homes, ctx.saved_tensors[4:]):
            return _BlockSparseFunction._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        call: _Call = ctx.call
        q, k, v, out, *leaves = ctx.saved_tensors
        dout = dout.contiguous()
        # rowsum(dO * O) = rowsum(P * dP), (B, H, Lq, 1): the softmax's gradient needs it
        norm = call.normalizer
        delta = torch.einsum("bhnd,bhnd->bhn", dout, out).unsqueeze(-1) if norm.needs_delta else None
        dq = torch.zeros_like(q) if call.skips_rows else torch.empty_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        want = [t for t in leaves if t.requires_grad]
        # a score's gradient sums over every group: accumulated in float64, then cast back
        dleaves = [torch.zeros_like(t, dtype=torch.float64) for t in want]
        score = call.score
        track = score is not None and (bool(want) or not score.additive)
        ws = _Workspace(q.dtype, q.device)
        d_q = q.shape[-1]
        G = call.groups
        q, k, v, dout = _Flat(q, G), _Flat(k), _Flat(v), _Flat(dout, G)
        delta = _Flat(delta, G) if delta is not None else None
        dqf, dkf, dvf = _Flat(dq, G), _Flat(dk), _Flat(dv)
        for gi, g in enumerate(call.work):
            hk, gq = call.heads_of(g)
            qg = call.rows_in(q, g, hk, gq)
            kg, vg = call.keys_in(k, g, hk, ws, "k"), call.keys_in(v, g, hk, ws, "v")
            do = call.rows_in(dout, g, hk, gq)
            if track:
                s, (raw, scored) = call.logits(qg, kg, g, hk, gq, ws, mode="track")
                p = norm.weights(s, call.Lk)
            else:
                s = call.logits(qg, kg, g, hk, gq, ws)
                p = norm.weights_(s, call.Lk)
            m = p.shape[1]
            dp = torch.bmm(do, vg.transpose(-2, -1), out=ws.get("dp", p.shape))
            if call.p > 0:
                keep = call.dropout_keep(p.shape, gi, ws)
                call.keys_mm(dvf, (p * keep).transpose(-2, -1), do, g, hk, ws, 1.0)
                dp.mul_(keep)
            else:
                call.keys_mm(dvf, p.transpose(-2, -1), do, g, hk, ws, 1.0)
            ds = norm.logits_grad_(dp, p, None if delta is None else call.rows_in(delta, g, hk, gq))
            if track:
                inputs = ([raw] if not score.additive else []) + want
                grads = torch.autograd.grad(scored, inputs, grad_outputs=ds, allow_unused=True)
                if not score.additive:
                    ds, grads = grads[0], grads[1:]
                for acc, gr in zip(dleaves, grads):
                    if gr is not None:
                        acc.add_(gr)
                del raw, scored
            dqg = ws.get("dq", (ds.shape[0], m, d_q))
            dqg.baddbmm_(ds, kg, beta=0.0, alpha=call.scale)
            call.rows_out(dqf, dqg, g, hk, gq)
            call.keys_mm(dkf, ds.transpose(-2, -1), qg, g, hk, ws, call.scale)
        it = iter(d.to(t.dtype) for d, t in zip(dleaves, want))
        grads_leaves = [next(it) if t.requires_grad else None for t in leaves]
        return (None, dq, dk, dv, *grads_leaves)


class BlockSparseBackend(Backend):
    """Block-sparse attention over the pattern's block layout, forward and backward, in plain torch.

    Args:
        q_block, kv_block: block sizes of the layout (query rows, keys); ``None``: 32 each, or the
            whole length when shorter.
        group_rows: query rows processed together (``None``: 64, and on a tiled plan up to 4
            tiles whose logits fit in 2 MiB). Larger groups mean fewer, larger matrix products;
            for a window pattern each group also reads ``group_rows`` more keys per row than a
            single row needs.
        max_group_elems: cap on one group's logits (batch x heads x rows x keys), which bounds
            the scratch memory for dense rows; a group is never smaller than one query block.
        window_slack: a group reads one contiguous slice of keys (no copy) when that slice holds at
            most ``1 + window_slack`` times the keys its densest row block needs; otherwise it
            gathers exactly the key blocks each query block needs. ``-1`` always gathers, ``inf``
            never does.
        backward: ``"recompute"`` (default: a custom autograd Function that saves q, k, v and the
            output, memory linear in the sequence, and recomputes the weights group by group) or
            ``"autograd"`` (plain autograd through the groups: keeps every group's weights, and
            supports double backward).
        mask_cache_bytes: masks of partially allowed blocks are kept with the plan up to this size.
        plan_cache: how many plans (pattern x shapes x device) to keep.
        tiles: visit grid patterns (``Neighborhood``, ``ShiftedWindow``, ``Halo``, ... on 2-D and
            3-D grids, alone or intersected) tile by tile when that computes fewer pairs than
            row-major blocks: each tile's queries gather the box of keys their windows cover.
        tile: per-axis tile size for grids with as many axes (others, and ``None``: chosen per
            pattern, about 64 queries per tile).
        tile_gain: the tiled plan is used when it computes at most this fraction of the pairs of
            the row-major one (gathering keys costs more than slicing them).
        native: run the tiles in the native CPU kernel (``multihead.backends.native``: one pass per
            tile, the weights over all of its keys at once, forward and backward) when it is built
            and can serve the request; otherwise, and with ``False``, in plain PyTorch.
            ``native_unsupported`` says why a request runs in PyTorch.
    """

    name = "blocksparse"

    def __init__(self, q_block: int | None = None, kv_block: int | None = None,
                 group_rows: int | None = None, max_group_elems: int = 1 << 21,
                 window_slack: float = 0.25, backward: str = "recompute",
                 mask_cache_bytes: int = 128 << 20, plan_cache: int = 16, tiles: bool = True,
                 tile: tuple[int, ...] | None = None, tile_gain: float = 0.75, native: bool = True):
        if backward not in ("recompute", "autograd"):
            raise ValueError(f"backward must be 'recompute' or 'autograd', got {backward!r}")
        for name, value in (("q_block", q_block), ("kv_block", kv_block), ("group_rows", group_rows)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.q_block, self.kv_block, self.group_rows = q_block, kv_block, group_rows
        self.max_group_elems = int(max_group_elems)
        self.window_slack = float(window_slack)
        self.backward = backward
        self.mask_cache_bytes = int(mask_cache_bytes)
        if tile is not None and (not isinstance(tile, tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in tile)):
            raise ValueError(f"tile must be None or a tuple of positive ints (one per grid axis), got {tile!r}")
        self.tiles, self.tile, self.tile_gain = bool(tiles), tile, float(tile_gain)
        self.native = bool(native)
        self._plans: OrderedDict = OrderedDict()
        self._plan_cache = int(plan_cache)

    def limits(self, req):
        if req.return_weights:
            return "does not return attention weights (use backend='reference')"
        if not isinstance(req.normalizer, (Softmax, Sigmoid)):
            return (f"serves the softmax and sigmoid normalizers (elementwise gradients per group), not "
                    f"{type(req.normalizer).__name__} (use backend='reference')")
        return None

    def choose_blocks(self, q_len: int, kv_len: int) -> tuple[int, int, int]:
        """``(q_block, kv_block, group_rows)`` of a row-major plan: the given ones, else 32, 32
        and 64."""
        return min(self.q_block or 32, q_len), min(self.kv_block or 32, kv_len), self.group_rows or 64

    def plan(self, req: Request, native: bool = False) -> _Plan:
        """The (cached) grouping of ``req``'s query blocks and the keys each group reads; for the
        native kernel (``native=True``) its tiles, with the tile table built from them."""
        qb, kb, gr = self.choose_native_blocks(req.q_len, req.kv_len) if native else \
            self.choose_blocks(req.q_len, req.kv_len)
        key = (req.pattern, req.q_len, req.kv_len, str(req.device), req.batch, req.heads,
               req.kv_heads, qb, kb, gr, native)
        try:
            plan = self._plans.get(key)
        except TypeError:  # an unhashable pattern: no caching
            key, plan = None, None
        if plan is None:
            plan = self._new_plan(req, qb, kb, gr, native)
            if native:
                plan.table = native_tiles.from_plan(plan, req.pattern, req.q_len, req.kv_len)
                plan.mask_bytes += plan.table.nbytes
            if key is not None:
                self._plans[key] = plan
                # bounded: at most plan_cache plans, whose cached masks total mask_cache_bytes
                while len(self._plans) > 1 and (
                        len(self._plans) > self._plan_cache
                        or sum(p.mask_bytes for p in self._plans.values()) > self.mask_cache_bytes):
                    self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def choose_native_blocks(self, q_len: int, kv_len: int) -> tuple[int, int, int]:
        """``(q_block, kv_block, group_rows)`` of a row-major plan for the native kernel: the given
        ones, else 32-row tiles over 32-key blocks: the fastest of 32 to 128 rows over 16 or 32
        keys for a 128-key window at 16k tokens (``docs/performance.md``)."""
        qb = min(self.q_block or 32, q_len)
        return qb, min(self.kv_block or 32, kv_len), qb

    def _new_plan(self, req: Request, qb: int, kb: int, gr: int, native: bool = False) -> _Plan:
        """A key-list plan for explicit per-query keys; for a grid pattern, the tiled plan when it
        computes clearly fewer pairs than the row-major one; else the row-major plan."""
        pattern, sizes = req.pattern, dict(max_group_elems=self.max_group_elems,
                                           elems_per_row=req.batch * req.heads)
        lists = pattern.key_lists()
        if lists is not None:
            return _key_list_plan(*lists, req.device, group_rows=self.group_rows or 64, **sizes)
        plan = _build_plan(pattern, req.q_len, req.kv_len, req.device, q_block=qb, kv_block=kb,
                           group_rows=gr, window_slack=self.window_slack, **sizes)
        box = pattern.tiling_box() if self.tiles else None
        if box is not None and pattern.num_heads is None:
            # the native kernel pays less per tile: smaller tiles, within twice the needed pairs
            choose = dict(target_rows=8, max_excess=2.0, max_rows=64, lanes=NATIVE_LANES) if native else {}
            tile = (self.tile if self.tile is not None and len(self.tile) == len(box.grid)
                    else _choose_tile(box, **choose))
            # a group of up to 4 tiles whose logits stay within 2 MiB: joining tiles amortises the
            # per-group overhead (gathers, small products), larger groups fall out of cache
            tiled = _tiled_plan(pattern, box, req.device, tile=tile,
                                group_rows=self.group_rows or 4 * math.prod(tile),
                                max_group_elems=min(self.max_group_elems, 1 << 19),
                                elems_per_row=sizes["elems_per_row"])
            if tiled.pairs < self.tile_gain * plan.pairs:
                return tiled
        return plan

    def native_unsupported(self, req: Request) -> str | None:
        """Why the native kernel cannot run ``req`` (a phrase), or None when it can."""
        if not self.native:
            return "the backend was built with native=False"
        if req.device.type != "cpu":
            return f"the native kernel runs on CPU (the tensors are on {req.device.type})"
        if req.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            return f"the native kernel serves float32, float64, bfloat16 and float16, not {req.dtype}"
        if not isinstance(req.normalizer, (Softmax, Sigmoid)):
            return f"the native kernel serves softmax and sigmoid, not {type(req.normalizer).__name__}"
        if req.needs_grad and self.backward == "autograd":
            return "backward='autograd' keeps PyTorch's graph"
        split = split_score(req.score)
        if isinstance(split, str):
            return f"the score {split}"
        _, why = native.status()
        return why

    def describe(self, req: Request) -> str:
        """Which path runs ``req``: the native kernel, or PyTorch tiles and why."""
        why = self.native_unsupported(req)
        return "native kernel" if why is None else f"PyTorch tiles: {why}"

    def forward(self, req):
        if self.native_unsupported(req) is None:
            return self._native_forward(req), None
        dtype = req.dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        call = _Call(req, self.plan(req), compute, self.mask_cache_bytes)
        if req.dropout > 0:
            call.seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.long).item())
        q, k, v = (t.to(compute).contiguous() for t in (req.q, req.k, req.v))
        if not req.needs_grad:
            with torch.no_grad():
                out = _forward_groups(call, q, k, v)
        else:
            found = _score_leaves(req.score, compute, req.device) if self.backward == "recompute" else None
            if found is None:
                out = _forward_groups_autograd(call, q, k, v)
            else:
                leaves, call.leaf_homes = found
                out = _BlockSparseFunction.apply(call, q, k, v, *leaves)
        return out.to(dtype), None

    def native_table(self, req: Request) -> native_tiles.TileTable:
        """The tile table the native kernel runs ``req`` on: one tile per query over its listed keys
        (``KeySelection``), tiles inside runs of the frame (Routing's clusters: each tile against
        its run in every head, no mask), else the (cached) plan's tiles."""
        lists = req.pattern.key_lists()
        if lists is not None:
            return native_tiles.from_key_lists(*lists)
        runs = req.pattern.frame_runs()
        if runs is not None:
            return native_tiles.from_runs(*runs)
        return self.plan(req, native=True).table

    def _native_forward(self, req: Request) -> Tensor:
        table = self.native_table(req)
        sigmoid = req.normalizer.bias_for(req.kv_len) if isinstance(req.normalizer, Sigmoid) else None
        return native_attention(table, req.q, req.k, req.v, req.scale, req.score, req.dropout, sigmoid)
