"""Tile tables: a block-sparse plan in the flat form the native kernel reads.

A tile is a run of rows of the plan's query frame and one list of key positions; the kernel
computes the tile's logits against exactly those keys. The arrays (all on the CPU):

* ``q_rows (R,)`` int64: the query index at each frame row (the identity for row-major plans);
* ``tile_q (T + 1,)`` and ``tile_k (T + 1,)`` int64: tile ``t`` owns frame rows
  ``q_rows[tile_q[t]:tile_q[t + 1]]`` and key slots ``tile_k[t]:tile_k[t + 1]``;
* ``k_idx (S, K)`` int64: the key positions of every slot, per layout slot ``s = b' * lh + h'``
  (``lb`` x ``lh`` slots: 1 unless the pattern differs per batch element or per query head);
* ``tile_m (T,)`` int64 and ``mask (S, M)`` uint8: the offset of the tile's mask (1 = allowed),
  or -1 when every listed key is allowed for every row; ``keys x rows`` (the kernel puts a tile's
  rows on vector lanes, so one key's bytes for consecutive rows are adjacent);
* optional, ``widths (S, T)`` int64: in slot ``s`` tile ``t`` uses only its first ``widths[s, t]``
  keys (slots whose key runs differ in length share one tile without a mask);
* optional, ``mask_keys (T,)`` int64: the tile's mask covers only its last ``mask_keys[t]`` keys
  (``keys x rows`` bytes), the earlier ones are allowed for every row;
* optional, ``k_start (S, T)`` int64: the tile's keys in slot ``s`` are the run ``k_start[s, t]``,
  ``k_start[s, t] + 1``, ...; ``k_idx`` is then empty and ``tile_k`` gives only the widths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...patterns.dynamic import every_slot


#: an optional array the table does not have (the kernel reads an empty one as absent)
_ABSENT = torch.zeros(0, dtype=torch.long)


@dataclass(eq=False)
class TileTable:
    q_rows: Tensor
    tile_q: Tensor
    tile_k: Tensor
    k_idx: Tensor
    tile_m: Tensor
    mask: Tensor
    lb: int
    lh: int
    #: computed (query, key) pairs per (batch, head)
    pairs: float
    widths: Tensor | None = None
    mask_keys: Tensor | None = None
    k_start: Tensor | None = None

    def arrays(self) -> tuple:
        optional = [_ABSENT if t is None else t for t in (self.widths, self.mask_keys, self.k_start)]
        return (self.q_rows, self.tile_q, self.tile_k, self.k_idx, self.tile_m, self.mask, *optional, self.lb,
                self.lh)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.arrays()[:9])


def _allowed(pattern, lb: int, lh: int, q_abs: Tensor, keys: Tensor) -> Tensor:
    """``pattern.mask_mod`` over (lb, lh) slots: q_abs (..., rows, 1), keys (..., 1, width)."""
    extra = [1] * (q_abs.dim() - 2)
    b = torch.arange(lb).view(-1, 1, *extra)
    h = torch.arange(lh).view(1, -1, *extra)
    return pattern.mask_mod(b, h, q_abs, keys)


def from_plan(plan, pattern, q_len: int, kv_len: int) -> TileTable:
    """The tile table of a ``blocksparse`` plan: a window group is one tile (its key slice, masked
    where the plan marks runs), each query block of a gathering group one tile (its gathered key
    blocks, masked by validity and, unless exact, by ``mask_mod``)."""
    lb, lh = plan.lb, plan.lh
    slots = lb * lh
    offset = kv_len - q_len
    order = plan.q_order.cpu() if plan.q_order is not None else torch.arange(q_len)
    tile_q, tile_k, tile_m = [0], [0], []
    keys, masks, k_total, m_total = [], [], 0, 0
    for g in plan.groups:
        rows_frame = order[g.r0:g.r1]
        if not g.gather:
            width = max(0, g.k1 - g.k0)  # none: rows that see no key (sigmoid), left at 0
            kp = torch.arange(g.k0, g.k0 + width).view(1, 1, 1, width)  # (lb', lh', blocks, width)
            ok = torch.ones(1, 1, 1, width, dtype=torch.bool)
            nblk, rows, need, exact = 1, g.r1 - g.r0, bool(g.runs), False
        else:
            kp, ok = g.kpos.cpu(), g.valid.cpu()
            nblk, rows, need, exact = g.nblk, g.rows, g.need_mask, g.exact
            width = kp.shape[-1]
        kp = kp.expand(lb, lh, nblk, width)
        ok = ok.expand(lb, lh, nblk, width)
        if need:
            q_abs = (rows_frame + offset).view(1, 1, nblk, rows, 1)
            allowed = ok.unsqueeze(-2)
            if not exact:
                allowed = allowed & _allowed(pattern, lb, lh, q_abs, kp.unsqueeze(-2))
            allowed = allowed.expand(lb, lh, nblk, rows, width)
        for j in range(nblk):
            keys.append(kp[:, :, j].reshape(slots, width))
            k_total += width
            tile_k.append(k_total)
            tile_q.append(tile_q[-1] + rows)
            if need:  # key-major: keys x rows
                masks.append(allowed[:, :, j].transpose(-1, -2).reshape(slots, rows * width))
                tile_m.append(m_total)
                m_total += rows * width
            else:
                tile_m.append(-1)
    pairs = sum((tile_q[i + 1] - tile_q[i]) * (tile_k[i + 1] - tile_k[i]) for i in range(len(tile_m)))
    return TileTable(
        q_rows=order.to(torch.long).contiguous(), tile_q=torch.tensor(tile_q, dtype=torch.long),
        tile_k=torch.tensor(tile_k, dtype=torch.long),
        k_idx=torch.cat(keys, 1).contiguous() if keys else torch.zeros(slots, 0, dtype=torch.long),
        tile_m=torch.tensor(tile_m, dtype=torch.long),
        mask=(torch.cat(masks, 1).to(torch.uint8).contiguous() if masks
              else torch.zeros(slots, 0, dtype=torch.uint8)),
        lb=lb, lh=lh, pairs=pairs)


def from_key_lists(indices: Tensor, valid: Tensor) -> TileTable:
    """One single-row tile per query, over its own listed keys (``KeySelection``). Invalid slots
    keep their indices, which must lie among the keys as ``KeySelection`` checks (the kernel refuses
    any other): the kernel reads every slot's row and masks the invalid ones (replacing their
    indices by key 0 first took a quarter of a ``TopK(64) & Causal()`` forward at 16k tokens)."""
    lb, lh, q_len, width = indices.shape
    slots = lb * lh
    indices, valid = indices.cpu(), valid.cpu()
    need = not every_slot(valid)
    return TileTable(
        q_rows=torch.arange(q_len), tile_q=torch.arange(q_len + 1),
        tile_k=torch.arange(q_len + 1) * width,
        k_idx=indices.reshape(slots, q_len * width).to(torch.long).contiguous(),
        tile_m=(torch.arange(q_len) * width) if need else torch.full((q_len,), -1, dtype=torch.long),
        mask=(valid.reshape(slots, q_len * width).to(torch.uint8).contiguous() if need
              else torch.zeros(slots, 0, dtype=torch.uint8)),
        lb=lb, lh=lh, pairs=q_len * width)


def from_runs(lengths: Tensor, causal: bool, rows: int = 32) -> TileTable:
    """Tiles for a frame cut into runs, where each row sees its own run: all of it, or (``causal``)
    up to itself. ``lengths (B', H', R)``: the runs of each layout slot in frame order (Routing's
    clusters, ``Pattern.frame_runs``; empty runs allowed).

    The frame's rows are cut at every slot's run starts, then into pieces of at most ``rows``, so
    that a tile's rows lie in one run of every slot. A tile's keys in a slot are then one run of the
    frame (``k_start``, ``widths``): its whole run, with no mask; or, causal, its run up to the
    tile's last row, the tile's own rows last under a ``rows x rows`` triangular mask."""
    lb, lh, _ = lengths.shape
    slots = lb * lh
    lengths = lengths.reshape(slots, -1).to(device="cpu", dtype=torch.long)
    ends = lengths.cumsum(1)
    starts = ends - lengths
    n = int(ends[0, -1])
    if not bool((ends[:, -1] == n).all()):
        raise ValueError(f"from_runs: every slot's runs must cover the same frame, got {ends[:, -1].tolist()}")
    cuts = torch.unique(starts)  # sorted
    cuts = cuts[cuts < n]
    seg_len = torch.diff(cuts, append=cuts.new_tensor([n]))
    pieces = (seg_len + rows - 1) // rows
    seg = torch.repeat_interleave(torch.arange(len(cuts)), pieces)
    r0 = cuts[seg] + (torch.arange(len(seg)) - (pieces.cumsum(0) - pieces)[seg]) * rows
    r1 = torch.minimum(r0 + rows, cuts[seg] + seg_len[seg])
    tiles, size = len(r0), r1 - r0
    # the run holding each tile in every slot: the first whose end lies past the tile's first row
    run = torch.searchsorted(ends, r0.expand(slots, tiles).contiguous(), right=True)
    k_start = starts.gather(1, run)
    widths = (r1 - k_start) if causal else (ends.gather(1, run) - k_start)  # (S, T)
    listed = widths.amax(0)
    table = dict(q_rows=torch.arange(n), tile_q=torch.cat([r0, r0.new_tensor([n])]),
                 tile_k=torch.cat([listed.new_zeros(1), listed.cumsum(0)]),
                 k_idx=torch.zeros(slots, 0, dtype=torch.long), lb=lb, lh=lh,
                 pairs=float((widths * size).sum()) / slots, widths=widths.contiguous(), k_start=k_start.contiguous())
    if not causal:
        return TileTable(tile_m=torch.full((tiles,), -1, dtype=torch.long),
                         mask=torch.zeros(slots, 0, dtype=torch.uint8), **table)
    area = size * size
    tile_m = area.cumsum(0) - area
    tile_of = torch.repeat_interleave(torch.arange(tiles), area)
    local = torch.arange(int(area.sum())) - tile_m[tile_of]
    key, row = local // size[tile_of], local % size[tile_of]  # key-major: keys x rows
    mask = (key <= row).to(torch.uint8).expand(slots, -1).contiguous()
    return TileTable(tile_m=tile_m, mask=mask, mask_keys=size, **table)
