"""The block-sparse backend's tiled plan (grid patterns visited tile by tile, each tile gathering
the box of keys its windows cover) and key-list plan (``KeySelection``: each row gathers its own
keys): equal to the reference, forward and gradients, with every tile size; exact coverage; no
N x N anywhere."""

from __future__ import annotations

import math

import pytest
import torch

from multihead.backends.blocksparse import NATIVE_LANES, BlockSparseBackend, _axis_tiles, _choose_tile
from multihead.backends.reference import ReferenceBackend
from multihead.patterns import dynamic
from multihead.patterns import (Axial, BlockLocal, Causal, Halo, KeyPadding, KeySelection, Neighborhood,
                                ShiftedWindow, SlidingWindow, TopK)
from multihead.request import make_request
from multihead.scores import ALiBi, RelativePositionBias

from test_blocksparse import _LargestTensor, _run

GRID = (10, 12)
N = GRID[0] * GRID[1]

GRID_PATTERNS = {
    "neighborhood": lambda: Neighborhood(5, grid=GRID),
    "neighborhood_dilated": lambda: Neighborhood((3, 5), dilation=(3, 2), grid=GRID),
    "neighborhood_strided_causal": lambda: Neighborhood(4, stride=(2, 4), causal=(True, False), grid=GRID),
    "neighborhood_3d": lambda: Neighborhood((2, 3, 5), grid=(2, 6, 10)),
    "swin_shifted": lambda: ShiftedWindow(4, 2, grid=GRID),
    "swin_plain": lambda: ShiftedWindow((5, 4), 0, grid=GRID),
    "halo": lambda: Halo(4, 1, grid=GRID),
    "block_local": lambda: BlockLocal((3, 5), grid=GRID),
    "axial_columns": lambda: Axial(GRID, 0),
    "neighborhood_and_causal": lambda: Neighborhood(5, grid=GRID) & Causal(),
    "neighborhood_and_padding": lambda: (Neighborhood(5, grid=GRID)
                                         & KeyPadding(torch.arange(N).expand(2, N) % 7 == 3)),
}
TILES = [None, (1, 1), (2, 4), (4, 4), (16, 16)]


def _inputs(seed, kv_heads=2, heads=4, dim=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, N, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(2, kv_heads, N, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(2, kv_heads, N, dim, generator=gen, dtype=torch.float64)
    return q, k, v, torch.randn(2, heads, N, dim, generator=gen, dtype=torch.float64)


def _tiled(tile=None, **options) -> BlockSparseBackend:
    """A backend that always takes the tiled plan (where the pattern has one)."""
    if tile is not None and len(tile) == 2:
        options["tile"] = tile
    return BlockSparseBackend(tile_gain=float("inf"), **options)


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "auto" if t is None else "x".join(map(str, t)))
@pytest.mark.parametrize("pattern_name", GRID_PATTERNS)
def test_tiled_plan_matches_reference(pattern_name, tile):
    """Forward and gradients of q, k, v (GQA) and a learnable relative-bias table, float64."""
    pattern = GRID_PATTERNS[pattern_name]()
    score = RelativePositionBias(4, num_buckets=8, max_distance=20).double()
    q, k, v, dout = _inputs(0)
    backend = _tiled(tile)
    plan = backend.plan(make_request(q, k, v, pattern=pattern))
    assert plan.q_order is not None, "the tiled plan was not taken"
    want = _run(ReferenceBackend(), q, k, v, torch.float64, pattern, score, dout)
    got = _run(backend, q, k, v, torch.float64, pattern, score, dout)
    for name, g, w in zip(["out", "dq", "dk", "dv", "dtable"], got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiled_plan_low_precision_within_tolerance(dtype):
    from test_blocksparse import _check

    pattern, score = Neighborhood(5, dilation=2, grid=GRID), ALiBi(4)
    q, k, v, dout = _inputs(1)
    truth = _run(ReferenceBackend(), q, k, v, torch.float64, pattern, score, dout)
    base = _run(ReferenceBackend(), q, k, v, dtype, pattern, score, dout)
    got = _run(_tiled(), q, k, v, dtype, pattern, score, dout)
    assert got[0].dtype == dtype
    _check(got, truth, base, dtype, ["out", "dq", "dk", "dv"])


def test_tiled_plan_gradcheck():
    gen = torch.Generator().manual_seed(3)
    grid = (5, 6)
    q, k, v = (torch.randn(1, 2, 30, 3, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    pattern = Neighborhood(3, dilation=(1, 2), grid=grid) & Causal()
    backend = _tiled((2, 2))

    def fn(q, k, v):
        return backend.forward(make_request(q, k, v, pattern=pattern, score=ALiBi(2)))[0]

    assert backend.plan(make_request(q, k, v, pattern=pattern)).q_order is not None
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("pattern_name", [n for n in GRID_PATTERNS if "_and_" not in n])
@pytest.mark.parametrize("tile", [1, 2, 3, 8])
def test_axis_tiles_cover_exactly(pattern_name, tile):
    """On every axis, a segment's keys are the union of its queries' allowed keys, segments hold
    queries of one class and at most ``tile`` of them, and "full" means every pair is allowed."""
    box = GRID_PATTERNS[pattern_name]().tiling_box()
    for axis, n in enumerate(box.grid):
        segments, keys, full = _axis_tiles(box, axis, tile)
        assert sorted(c for s in segments for c in s) == list(range(n))
        x = torch.arange(n)
        cls = box.axis_class(axis, x)
        r = box.axis_range(axis, x)
        for seg, cols, f in zip(segments, keys, full):
            assert 1 <= len(seg) <= tile and len(set(cls[seg].tolist())) == 1
            allowed = torch.zeros(len(seg), n, dtype=torch.bool)
            for row, c in enumerate(seg):
                allowed[row, r.start[c] + r.step * torch.arange(int(r.count[c]))] = True
            assert torch.equal(cols, allowed.any(0).nonzero().flatten())
            assert f == bool(allowed[:, cols].all())


def test_windows_become_single_tiles():
    """Swin windows and blocks are tiles of their own: each tile's keys are exactly its window, so
    no pair is wasted and no mask is needed."""
    for pattern in (ShiftedWindow(4, 0, grid=(8, 12)), BlockLocal((2, 3), grid=(8, 12))):
        q = torch.randn(1, 2, 96, 8)
        plan = _tiled().plan(make_request(q, q, q, pattern=pattern))
        assert plan.pairs == pattern.dense_mask(96, 96).sum().item()
        assert not any(g.need_mask for g in plan.groups)


def test_auto_takes_the_tiled_plan_where_it_saves_work():
    """A 2-D neighborhood computes fewer pairs tiled; a 1-D window keeps its row-major plan."""
    backend = BlockSparseBackend()
    q = torch.randn(1, 2, 32 * 32, 8)
    plan = backend.plan(make_request(q, q, q, pattern=Neighborhood(7, grid=(32, 32))))
    rowmajor = BlockSparseBackend(tiles=False).plan(make_request(q, q, q, pattern=Neighborhood(7, grid=(32, 32))))
    assert plan.q_order is not None and plan.pairs < 0.75 * rowmajor.pairs
    assert backend.plan(make_request(q, q, q, pattern=SlidingWindow(16, 16))).q_order is None
    assert backend.plan(make_request(q, q, q, pattern=Neighborhood(7, grid=(1024,)))).q_order is None


def test_choose_tile_prefers_windows_and_small_boxes():
    assert _choose_tile(ShiftedWindow(8, 0, grid=(64, 64))) in ((8, 8), (8, 16), (16, 8), (16, 16))
    tile = _choose_tile(Neighborhood(7, grid=(64, 64)))
    assert 16 <= tile[0] * tile[1] <= 256


def test_native_tiles_are_charged_for_whole_lane_blocks():
    """The native kernel computes a tile's rows 16 at a time: a 13 x 13 neighborhood's 4 x 6 tiles
    (24 rows, computed as 32) lose to 4 x 4 once rows are rounded up to whole blocks, and a tile too
    small for the lanes (run a row at a time) is taken only where no larger one stays within twice
    the needed pairs."""
    native = dict(target_rows=8, max_excess=2.0, max_rows=64)
    box = Neighborhood(13, grid=(128, 128)).tiling_box()
    assert math.prod(_choose_tile(box, **native)) == 24
    assert _choose_tile(box, **native, lanes=NATIVE_LANES) == (4, 4)
    for kernel in (5, 7, 9, 11, 15, 21):
        assert math.prod(_choose_tile(Neighborhood(kernel, grid=(64, 64)).tiling_box(), **native, lanes=16)) >= 8
    assert math.prod(_choose_tile(Neighborhood(3, grid=(64, 64)).tiling_box(), **native, lanes=16)) < 8
    q = torch.randn(1, 1, 64 * 64, 8)
    plan = BlockSparseBackend().plan(make_request(q, q, q, pattern=Neighborhood(13, grid=(64, 64))), native=True)
    rows = plan.table.tile_q.diff()
    assert (rows == 16).float().mean() > 0.9


def test_tile_option_is_checked():
    for bad in ((0, 4), [4, 4], (4.0, 4), (True, 2)):
        with pytest.raises(ValueError, match="tile"):
            BlockSparseBackend(tile=bad)


def test_tiled_plan_has_no_n_by_n_buffer():
    grid = (48, 48)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3))
    with _LargestTensor() as mode:
        out, _ = _tiled().forward(make_request(q, k, v, pattern=Neighborhood(5, grid=grid)))
        out.sum().backward()
    assert mode.largest < n * n // 4


# -- key lists ----------------------------------------------------------------------------------


def test_key_selection_runs_from_its_lists():
    """Explicit per-row keys (with invalid slots) equal the reference, forward and gradients; the
    plan computes exactly the listed pairs."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = _inputs(5)
    indices = torch.stack([torch.randperm(N, generator=gen)[:9] for _ in range(2 * 4 * N)]).view(2, 4, N, 9)
    valid = torch.rand(2, 4, N, 9, generator=gen) > 0.3
    valid[..., 0] = True
    pattern = KeySelection(indices.sort(-1).values, valid, N)
    want = _run(ReferenceBackend(), q, k, v, torch.float64, pattern, ALiBi(4), dout)
    backend = BlockSparseBackend(group_rows=16)
    got = _run(backend, q, k, v, torch.float64, pattern, ALiBi(4), dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    assert backend.plan(make_request(q, k, v, pattern=pattern)).pairs == N * 9


def test_topk_needs_no_n_by_n_buffer(monkeypatch):
    """TopK's selection makes logits a chunk of rows at a time (``SELECTION_CHUNK_ELEMENTS``); the
    attention then touches only the k keys of each row."""
    monkeypatch.setattr(dynamic, "SELECTION_CHUNK_ELEMENTS", 1 << 16)
    n = 2048
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
    with _LargestTensor() as mode:
        out, _ = BlockSparseBackend().forward(make_request(q, k, v, pattern=TopK(16) & Causal()))
        out.sum().backward()
    assert mode.largest <= max(1 << 16, q.numel())
    ref = ReferenceBackend().forward(make_request(q.detach(), k.detach(), v.detach(),
                                                  pattern=TopK(16) & Causal()))[0]
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)
