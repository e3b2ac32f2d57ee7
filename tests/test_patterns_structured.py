"""Structured patterns: local, dilated, grid (NATTEN neighborhoods, Swin windows, axial), global
tokens, blocks and halos, per-head patterns (CSWin).

Every pattern is checked three ways: ``mask_mod`` pair by pair against ``dense_mask``; the analytic
spans (mask, counts, block layouts) against the dense mask; and the dense mask against a direct,
loop-by-loop transcription of the pattern's definition in its paper / reference code.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multihead.errors import PatternError
from multihead.patterns.base import Pattern
from multihead.patterns import (
    Axial, BlockLayout, BlockLocal, Causal, CrossShapedWindow, Dilated, Documents, GlobalTokens,
    Halo, Neighborhood, PerHead, ShiftedWindow, SlidingWindow,
)

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# -- generic checks -----------------------------------------------------------------------------


def assert_spans_match(pattern, q_len, kv_len, blocks=((1, 1), (3, 5), (16, 16))):
    """Spans, counts and block layouts derived analytically equal those of the dense mask."""
    dense = pattern.dense_mask(q_len, kv_len)
    spans = pattern.spans(q_len, kv_len)
    mask = spans.mask()
    assert torch.equal(mask.expand_as(dense), dense)
    assert torch.equal(spans.counts().expand(dense.shape[:-1]), dense.sum(-1))
    for qb, kvb in blocks:
        got = pattern.block_layout(q_len, kv_len, qb, kvb).state
        want = BlockLayout.from_mask(dense, qb, kvb).state
        assert torch.equal(got.expand_as(want), want), (qb, kvb)
    return dense


def assert_pairwise(pattern, q_len, kv_len):
    """``dense_mask`` equals ``mask_mod`` called on scalar tensors, one pair at a time."""
    dense = pattern.dense_mask(q_len, kv_len)
    mod = pattern.aligned_mask_mod(q_len, kv_len)
    t = torch.tensor
    for b, h, q, kv in itertools.product(range(dense.shape[0]), range(dense.shape[1]),
                                         range(q_len), range(kv_len)):
        assert bool(mod(t(b), t(h), t(q), t(kv))) == bool(dense[b, h, q, kv]), (b, h, q, kv)


def from_pairs(n_q, n_kv, allowed) -> torch.Tensor:
    """Dense ``(n_q, n_kv)`` mask of a Python predicate, by explicit loops."""
    return torch.tensor([[bool(allowed(q, kv)) for kv in range(n_kv)] for q in range(n_q)],
                        dtype=torch.bool).view(n_q, n_kv)


def grid_coords(grid):
    """All coordinates of a grid, in row-major (flattened token) order."""
    return list(itertools.product(*(range(n) for n in grid)))


def block_sizes():
    return st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=3)


# -- NATTEN neighborhood reference --------------------------------------------------------------


def natten_axis_keys(n, kernel, dilation, stride, causal, x):
    """Key coordinates query ``x`` sees along one axis, from NATTEN's definition.

    The axis splits into ``dilation`` interleaved sub-grids; each is attended as an undilated
    neighborhood. Queries are grouped by ``stride`` and use the window of the group's leader (the
    center query, right of center for an even stride; the last query when causal), clipped to the
    sub-grid. Non-causal: the ``kernel`` consecutive sub-grid keys whose center is nearest to the
    leader. Causal: sub-grid keys ``b`` with ``leader - kernel < b <= query``.
    """
    sub = list(range(x % dilation, n, dilation))
    length, a = len(sub), sub.index(x)
    group = (a // stride) * stride
    if causal:
        leader = min(group + stride - 1, length - 1)
        return {sub[b] for b in range(length) if leader - kernel < b <= a}
    leader = min(group + stride // 2, length - 1)
    starts = range(length - kernel + 1)
    start = min(starts, key=lambda t: abs(t + kernel // 2 - leader))
    return set(sub[start:start + kernel])


def natten_reference(grid, kernel, dilation, stride, causal):
    """Neighborhood mask by explicit loops over query and key coordinates."""
    axes = [{x: natten_axis_keys(grid[i], kernel[i], dilation[i], stride[i], causal[i], x)
             for x in range(grid[i])} for i in range(len(grid))]
    cells = grid_coords(grid)
    rows = []
    for qc in cells:
        rows.append([all(kc[i] in axes[i][qc[i]] for i in range(len(grid))) for kc in cells])
    return torch.tensor(rows, dtype=torch.bool)


def natten_cpu_window_start(index, length, kernel, dilation):
    """NATTEN's naive CPU kernel ``get_window_start`` (stride 1, not causal), transcribed."""
    nh = kernel // 2
    if dilation <= 1:
        return max(index - nh, 0) + (index + nh >= length) * (length - index - nh - 1)
    ni = index - nh * dilation
    if ni < 0:
        return index % dilation
    if index + nh * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * nh * dilation
        return a + imodd - kernel * dilation
    return ni


@st.composite
def neighborhood_args(draw, causal=None, max_side=None):
    ndim = draw(st.integers(1, 3))
    cap = max_side or {1: 24, 2: 10, 3: 5}[ndim]
    grid, kernel, dilation, stride, is_causal = [], [], [], [], []
    for _ in range(ndim):
        n = draw(st.integers(1, cap))
        c = draw(st.booleans()) if causal is None else causal
        # Small dilations mostly (larger ones leave room only for tiny kernels), then kernels and
        # strides biased to the top of their range, so windows, strides and edges all matter.
        d = draw(st.integers(1, min(n, 3)) | st.integers(1, n))
        kmax = n // d
        kernels = list(range(1, kmax + 1)) if c else list(range(1, kmax + 1, 2))
        k = draw(st.sampled_from(kernels[-3:]) | st.sampled_from(kernels))
        s = draw(st.integers(max(1, k // 2), k) | st.integers(1, k))
        for lst, v in zip((grid, kernel, dilation, stride, is_causal), (n, k, d, s, c)):
            lst.append(v)
    return tuple(grid), tuple(kernel), tuple(dilation), tuple(stride), tuple(is_causal)


@SETTINGS
@given(neighborhood_args(), block_sizes())
def test_neighborhood_matches_natten_definition(args, blocks):
    grid, kernel, dilation, stride, causal = args
    p = Neighborhood(kernel, dilation=dilation, stride=stride, causal=causal, grid=grid)
    n = math.prod(grid)
    dense = assert_spans_match(p, n, n, blocks)
    assert torch.equal(dense[0, 0], natten_reference(grid, kernel, dilation, stride, causal))


@pytest.mark.parametrize("grid, kernel, dilation, stride, causal", [
    ((13,), (5,), (1,), (2,), (False,)),      # even stride: right-of-center leader
    ((13,), (5,), (1,), (3,), (False,)),      # last group {12} is partial: leader clipped
    ((11,), (3,), (3,), (2,), (False,)),      # sub-grids of lengths 4, 4, 3
    ((11,), (4,), (2,), (3,), (True,)),       # causal: the leader is the group's last query
    ((10, 9), (3, 4), (3, 2), (3, 2), (False, True)),
    ((5, 6, 7), (3, 2, 3), (1, 3, 2), (2, 2, 3), (False, True, False)),
])
def test_neighborhood_strided_dilated_cases(grid, kernel, dilation, stride, causal):
    p = Neighborhood(kernel, dilation=dilation, stride=stride, causal=causal, grid=grid)
    n = math.prod(grid)
    dense = assert_spans_match(p, n, n)
    assert torch.equal(dense[0, 0], natten_reference(grid, kernel, dilation, stride, causal))


@SETTINGS
@given(neighborhood_args(causal=False))
def test_neighborhood_every_query_sees_prod_kernel_keys(args):
    grid, kernel, dilation, stride, _ = args
    p = Neighborhood(kernel, dilation=dilation, stride=stride, grid=grid)
    n = math.prod(grid)
    counts = p.spans(n, n).counts()
    assert (counts == math.prod(kernel)).all()
    assert (p.dense_mask(n, n).sum(-1) == math.prod(kernel)).all()


@SETTINGS
@given(neighborhood_args(causal=False))
def test_neighborhood_stride1_matches_natten_cpu_kernel(args):
    grid, kernel, dilation, _, _ = args
    p = Neighborhood(kernel, dilation=dilation, grid=grid)
    windows = []
    for n, k, d in zip(grid, kernel, dilation):
        windows.append({x: {natten_cpu_window_start(x, n, k, d) + j * d for j in range(k)}
                        for x in range(n)})
    cells = grid_coords(grid)
    want = from_pairs(len(cells), len(cells), lambda q, kv: all(
        cells[kv][i] in windows[i][cells[q][i]] for i in range(len(grid))))
    n = len(cells)
    assert torch.equal(p.dense_mask(n, n)[0, 0], want)


@pytest.mark.parametrize("kwargs, grid", [
    (dict(kernel=3), (7,)),
    (dict(kernel=3, dilation=2, stride=2), (9,)),
    (dict(kernel=4, stride=3, causal=True), (8,)),
    (dict(kernel=(3, 2), dilation=(2, 1), stride=(1, 2), causal=(False, True)), (7, 4)),
    (dict(kernel=(1, 3, 2), dilation=(1, 1, 2), causal=(True, False, True)), (2, 3, 4)),
])
def test_neighborhood_mask_mod_pairwise(kwargs, grid):
    p = Neighborhood(grid=grid, **kwargs)
    n = math.prod(grid)
    assert_pairwise(p, n, n)


def test_neighborhood_normalizes_per_axis_arguments():
    p = Neighborhood(5, dilation=(1, 2), stride=2, causal=(True, False), grid=[10, 12])
    assert p.kernel == (5, 5) and p.dilation == (1, 2) and p.stride == (2, 2)
    assert p.causal == (True, False) and p.grid == (10, 12)
    assert p == Neighborhood((5, 5), (1, 2), (2, 2), (True, False), (10, 12))
    assert Neighborhood(3, grid=9).grid == (9,)


def test_neighborhood_known_edges():
    # 1-D, n=7, kernel 3: windows shift inward at both ends.
    rows = Neighborhood(3, grid=(7,)).dense_mask(7, 7)[0, 0]
    starts = [int(r.nonzero()[0]) for r in rows]
    assert starts == [0, 0, 1, 2, 3, 4, 4]
    # dilation 2 on n=7: sub-grids {0,2,4,6} and {1,3,5}; query 5 (last of the short sub-grid).
    row = Neighborhood(3, dilation=2, grid=(7,)).dense_mask(7, 7)[0, 0, 5]
    assert row.nonzero().flatten().tolist() == [1, 3, 5]
    # stride 2, kernel 3: queries {0,1} follow leader 1, {2,3} leader 3, ... {8} leader 8.
    rows = Neighborhood(3, stride=2, grid=(9,)).dense_mask(9, 9)[0, 0]
    assert [r.nonzero().flatten().tolist() for r in rows[[0, 1, 2, 8]]] == [
        [0, 1, 2], [0, 1, 2], [2, 3, 4], [6, 7, 8]]
    # causal, stride 3, kernel 4: group {0,1,2} has leader 2; query 0 sees only key 0.
    rows = Neighborhood(4, stride=3, causal=True, grid=(9,)).dense_mask(9, 9)[0, 0]
    assert rows[0].nonzero().flatten().tolist() == [0]
    assert rows[5].nonzero().flatten().tolist() == [2, 3, 4, 5]


@SETTINGS
@given(st.integers(1, 30), st.integers(0, 5), st.integers(0, 5), block_sizes())
def test_neighborhood_causal_combinations(n, half, extra, blocks):
    p = Neighborhood(min(2 * half + 1 + extra % 2, n), grid=(n,))  # odd or even kernels
    combos = [p & Causal(), p | Dilated(extra, 2), Neighborhood(min(3, n), causal=True, grid=(n,)) & p]
    if n > 1:
        combos.append((p & Causal()) | GlobalTokens(1))
    for combo in combos:
        assert_spans_match(combo, n, n, blocks)
    want = p.dense_mask(n, n) & torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal((p & Causal()).dense_mask(n, n), want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel=3), r"Neighborhood needs grid="),
    (dict(kernel=3, grid=(2, 2, 2, 2)), r"Neighborhood\.grid must be"),
    (dict(kernel=3, grid=(4, 0)), r"Neighborhood\.grid\[1\] must be an integer >= 1"),
    (dict(kernel=0, grid=(4,)), r"Neighborhood\.kernel must be an integer >= 1"),
    (dict(kernel=(3, 3, 3), grid=(4, 4)), r"Neighborhood\.kernel must be an int or a tuple of 2"),
    (dict(kernel=3, dilation=(1, 2), grid=(9, 5)), r"kernel\[1\] \* dilation\[1\] = 3 \* 2 = 6 exceeds"),
    (dict(kernel=5, grid=(4,)), r"kernel\[0\] \* dilation\[0\] = 5 \* 1 = 5 exceeds the grid size 4"),
    (dict(kernel=3, stride=(1, 4), grid=(9, 9)), r"stride\[1\]=4 exceeds kernel\[1\]=3"),
    (dict(kernel=3, stride=0, grid=(9,)), r"Neighborhood\.stride must be an integer >= 1"),
    (dict(kernel=3, dilation=0, grid=(9,)), r"Neighborhood\.dilation must be an integer >= 1"),
    (dict(kernel=3, causal=(True,), grid=(9, 9)), r"Neighborhood\.causal must be a bool or a tuple of 2"),
    (dict(kernel=3, causal=1, grid=(9,)), r"Neighborhood\.causal must be a bool"),
])
def test_neighborhood_errors(kwargs, match):
    with pytest.raises(PatternError, match=match):
        Neighborhood(**kwargs)


def test_grid_length_errors():
    for p in (Neighborhood(3, grid=(4, 5)), ShiftedWindow(2, 1, grid=(4, 5)), Axial((4, 5), 0),
              BlockLocal(2, grid=(4, 5)), Halo(2, 1, grid=(4, 5)), CrossShapedWindow(2, (4, 5), 2)):
        name = type(p).__name__
        with pytest.raises(PatternError, match=rf"{name} has grid=\(4, 5\), i\.e\. 20 tokens, but "
                                               rf"got q_len=20, kv_len=21"):
            p.spans(20, 21)
        with pytest.raises(PatternError, match=r"pass the grid whose product is the sequence length"):
            p.dense_mask(19, 19)


def test_neighborhood_matches_natten_library():
    natten = pytest.importorskip("natten")
    torch.manual_seed(0)
    cases = [((9,), dict(kernel_size=3)), ((8, 7), dict(kernel_size=(3, 5), dilation=(2, 1))),
             ((7, 9), dict(kernel_size=(3, 3), stride=(2, 3), is_causal=(True, False)))]
    for grid, kw in cases:
        p = Neighborhood(kw["kernel_size"], dilation=kw.get("dilation", 1),
                         stride=kw.get("stride", 1), causal=kw.get("is_causal", False), grid=grid)
        q, k, v = (torch.randn(1, *grid, 2, 8) for _ in range(3))
        name = f"na{len(grid)}d"
        fn = getattr(natten, name, None) or getattr(getattr(natten, "functional", None), name, None)
        if fn is None:
            pytest.skip(f"this NATTEN has no {name}")
        try:
            out = fn(q, k, v, **kw)
        except Exception as err:  # no CPU backend in this NATTEN build
            pytest.skip(f"natten cannot run on CPU here: {err}")
        n = math.prod(grid)
        qf, kf, vf = (t.reshape(1, n, 2, 8).transpose(1, 2) for t in (q, k, v))
        mask = p.dense_mask(n, n)
        want = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)
        torch.testing.assert_close(out.reshape(1, n, 2, 8).transpose(1, 2), want,
                                   atol=1e-4, rtol=1e-4)


# -- Dilated (Longformer) -----------------------------------------------------------------------


@SETTINGS
@given(st.integers(1, 40), st.integers(0, 10), st.integers(0, 4), st.integers(1, 5),
       st.booleans(), block_sizes())
def test_dilated(kv_len, q_less, window, dilation, causal, blocks):
    q_len = max(kv_len - q_less, 1)
    p = Dilated(window, dilation)
    combo = p & Causal() if causal else p
    dense = assert_spans_match(combo, q_len, kv_len, blocks)
    off = kv_len - q_len

    def allowed(q, kv):
        i = q + off
        ok = any(kv == i + m * dilation for m in range(-window, window + 1))
        return ok and (kv <= i or not causal)

    assert torch.equal(dense[0, 0], from_pairs(q_len, kv_len, allowed))


def test_dilated_pairwise_and_errors():
    assert_pairwise(Dilated(2, 3), 9, 12)
    assert_pairwise(Dilated(2, 3) & Causal(), 12, 12)
    assert torch.equal(Dilated(3, 1).dense_mask(10, 10), SlidingWindow(3, 3).dense_mask(10, 10))
    with pytest.raises(PatternError, match=r"Dilated\.window must be an integer >= 0"):
        Dilated(-1, 2)
    with pytest.raises(PatternError, match=r"Dilated\.dilation must be an integer >= 1"):
        Dilated(2, 0)


# -- Swin shifted windows -----------------------------------------------------------------------


def swin_reference(grid, window, shift):
    """Swin's mask: pad to whole windows, roll by -shift, window partition, region mask."""
    (h, w), (wh, ww), (sh, sw) = grid, window, shift
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    ids = torch.full((hp, wp), -1, dtype=torch.long)
    ids[:h, :w] = torch.arange(h * w).view(h, w)
    img_mask = torch.zeros(hp, wp, dtype=torch.long)
    h_slices = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh else (slice(None),)
    w_slices = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw else (slice(None),)
    cnt = 0
    for hs in h_slices:
        for ws in w_slices:
            img_mask[hs, ws] = cnt
            cnt += 1
    shifted = torch.roll(ids, shifts=(-sh, -sw), dims=(0, 1))

    def partition(x):
        return x.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)

    win_ids, win_mask = partition(shifted), partition(img_mask)
    out = torch.zeros(h * w, h * w, dtype=torch.bool)
    for tokens, regions in zip(win_ids.tolist(), win_mask.tolist()):
        for a, ra in zip(tokens, regions):
            for b, rb in zip(tokens, regions):
                if a >= 0 and b >= 0 and ra == rb:  # attn_mask = 0 where regions agree
                    out[a, b] = True
    return out


@st.composite
def swin_args(draw):
    grid = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    window = tuple(draw(st.integers(1, n)) for n in grid)
    shift = tuple(draw(st.integers(0, wd - 1)) for wd in window)
    return grid, window, shift


@SETTINGS
@given(swin_args(), block_sizes())
def test_shifted_window_matches_swin(args, blocks):
    grid, window, shift = args
    p = ShiftedWindow(window, shift, grid=grid)
    n = math.prod(grid)
    dense = assert_spans_match(p, n, n, blocks)
    assert torch.equal(dense[0, 0], swin_reference(grid, window, shift))


def test_shifted_window_plain_and_pairwise():
    n = 48
    plain = ShiftedWindow(4, 0, grid=(6, 8)).dense_mask(n, n)[0, 0]
    ys, xs = torch.arange(n) // 8, torch.arange(n) % 8
    want = ((ys[:, None] // 4) == (ys[None] // 4)) & ((xs[:, None] // 4) == (xs[None] // 4))
    assert torch.equal(plain, want)
    assert ShiftedWindow(4, 2, grid=(8, 8)).shift == (2, 2)
    assert_pairwise(ShiftedWindow((2, 3), (1, 2), grid=(4, 5)), 20, 20)


@pytest.mark.parametrize("args, match", [
    ((4, 2, (8, 8, 8)), r"ShiftedWindow\.grid must be a 2-D tuple"),
    ((0, 0, (8, 8)), r"ShiftedWindow\.window must be an integer >= 1"),
    (((4, 9), 0, (8, 8)), r"ShiftedWindow\.window\[1\]=9 exceeds the grid size 8"),
    ((4, 4, (8, 8)), r"ShiftedWindow\.shift\[0\]=4 must be smaller than window\[0\]=4"),
    ((4, -1, (8, 8)), r"ShiftedWindow\.shift must be an integer >= 0"),
    ((4, 2, None), r"ShiftedWindow needs grid="),
])
def test_shifted_window_errors(args, match):
    with pytest.raises(PatternError, match=match):
        ShiftedWindow(*args)


# -- Axial --------------------------------------------------------------------------------------


@SETTINGS
@given(st.lists(st.integers(1, 6), min_size=2, max_size=3), st.integers(-3, 2), block_sizes())
def test_axial(grid, axis, blocks):
    grid = tuple(grid)
    axis = axis % len(grid)
    p = Axial(grid, axis)
    n = math.prod(grid)
    dense = assert_spans_match(p, n, n, blocks)
    cells = grid_coords(grid)
    want = from_pairs(n, n, lambda q, kv: all(
        cells[q][i] == cells[kv][i] for i in range(len(grid)) if i != axis))
    assert torch.equal(dense[0, 0], want)
    assert dense[0, 0].sum(-1).eq(grid[axis]).all()


def test_axial_pairwise_and_errors():
    assert_pairwise(Axial((3, 4), -1), 12, 12)
    assert_pairwise(Axial((2, 3, 2), 0), 12, 12)
    assert Axial((3, 4), -1).axis == 1
    with pytest.raises(PatternError, match=r"Axial\.axis must be an int in \[-2, 1\]"):
        Axial((3, 4), 2)
    with pytest.raises(PatternError, match=r"Axial\.grid must be a 2-D or 3-D tuple"):
        Axial((12,), 0)


# -- global tokens ------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(2, 40), st.integers(0, 10), st.integers(1, 5), st.integers(0, 4), block_sizes())
def test_global_tokens_with_sliding_window(kv_len, q_less, n, w, blocks):
    n = min(n, kv_len - 1)
    q_len = max(kv_len - q_less, 1)
    off = kv_len - q_len
    g = GlobalTokens(n)
    dense = assert_spans_match(g, q_len, kv_len, blocks)
    assert torch.equal(dense[0, 0], from_pairs(q_len, kv_len, lambda q, kv: q + off < n or kv < n))
    if w < kv_len - 1:
        longformer = g | SlidingWindow(w, w)
        dense = assert_spans_match(longformer, q_len, kv_len, blocks)
        want = from_pairs(q_len, kv_len,
                          lambda q, kv: q + off < n or kv < n or abs(q + off - kv) <= w)
        assert torch.equal(dense[0, 0], want)
        assert_spans_match(longformer & Causal(), q_len, kv_len, blocks)


def test_global_tokens_pairwise_and_errors():
    assert_pairwise(GlobalTokens(2) | SlidingWindow(1, 1), 8, 10)
    with pytest.raises(PatternError, match=r"GlobalTokens\.n must be an integer >= 1"):
        GlobalTokens(0)
    with pytest.raises(PatternError, match=r"GlobalTokens\(n=5\) makes all 5 keys global.*Full\(\)"):
        GlobalTokens(5).spans(5, 5)


# -- blocks and halos ---------------------------------------------------------------------------


@SETTINGS
@given(st.integers(1, 40), st.integers(0, 10), st.integers(1, 9), st.integers(0, 4),
       st.booleans(), block_sizes())
def test_block_local_and_halo_1d(kv_len, q_less, block, halo, causal, blocks):
    q_len = max(kv_len - q_less, 1)
    off = kv_len - q_len
    for p, h in ((BlockLocal(block), 0), (Halo(block, halo), halo)):
        combo = p & Causal() if causal else p
        dense = assert_spans_match(combo, q_len, kv_len, blocks)

        def allowed(q, kv):
            i = q + off
            lo = (i // block) * block
            return lo - h <= kv < lo + block + h and (kv <= i or not causal)

        assert torch.equal(dense[0, 0], from_pairs(q_len, kv_len, allowed))


@st.composite
def blocked_grid_args(draw):
    ndim = draw(st.integers(1, 3))
    cap = {1: 24, 2: 10, 3: 5}[ndim]
    grid = tuple(draw(st.integers(1, cap)) for _ in range(ndim))
    block = tuple(draw(st.integers(1, n)) for n in grid)
    halo = tuple(draw(st.integers(0, 3)) for _ in grid)
    return grid, block, halo


@SETTINGS
@given(blocked_grid_args(), block_sizes())
def test_block_local_and_halo_grid(args, blocks):
    grid, block, halo = args
    n = math.prod(grid)
    cells = grid_coords(grid)
    for p, hl in ((BlockLocal(block, grid=grid), (0,) * len(grid)), (Halo(block, halo, grid=grid), halo)):
        dense = assert_spans_match(p, n, n, blocks)

        def allowed(q, kv):
            for i in range(len(grid)):
                lo = (cells[q][i] // block[i]) * block[i]
                if not lo - hl[i] <= cells[kv][i] < lo + block[i] + hl[i]:
                    return False
            return True

        assert torch.equal(dense[0, 0], from_pairs(n, n, allowed))


def test_block_local_halo_pairwise_and_errors():
    assert_pairwise(BlockLocal(3), 7, 10)
    assert_pairwise(Halo((2, 3), (1, 0), grid=(4, 5)), 20, 20)
    assert_pairwise(BlockLocal((2, 2, 3), grid=(2, 3, 3)), 18, 18)
    assert BlockLocal(2, grid=(4, 6)).block == (2, 2)
    with pytest.raises(PatternError, match=r"BlockLocal\.block must be an integer >= 1"):
        BlockLocal(0)
    with pytest.raises(PatternError, match=r"BlockLocal\.block\[1\]=7 exceeds the grid size 6"):
        BlockLocal((2, 7), grid=(4, 6))
    with pytest.raises(PatternError, match=r"Halo\.halo must be an integer >= 0"):
        Halo(4, -1)
    with pytest.raises(PatternError, match=r"Halo\.halo\[0\] must be an integer >= 0"):
        Halo(2, (-1, 1), grid=(4, 6))
    with pytest.raises(PatternError, match=r"Halo\.block must be an int or a tuple of 2"):
        Halo((2, 2, 2), 1, grid=(4, 6))


# -- per-head patterns --------------------------------------------------------------------------


def test_per_head_stacks_patterns():
    parts = (Causal(), Dilated(1, 3), BlockLocal(4) | GlobalTokens(1), Halo(3, 1) & Causal())
    p = PerHead(parts)
    assert p.num_heads == 4 and p.batch_size is None
    for q_len, kv_len in ((13, 13), (5, 13)):
        dense = assert_spans_match(p, q_len, kv_len, ((1, 1), (4, 3), (8, 8)))
        assert dense.shape == (1, 4, q_len, kv_len)
        for h, part in enumerate(parts):
            assert torch.equal(dense[:, h], part.dense_mask(q_len, kv_len)[:, 0])
    assert_pairwise(p, 6, 9)
    assert_pairwise(PerHead([Causal(), Neighborhood(3, grid=(3, 3))]), 9, 9)


def test_per_head_mask_mod_with_head_tensor():
    p = PerHead((Causal(), Dilated(0, 1)))
    h = torch.tensor([[0], [1]])
    q = torch.tensor([[3], [3]])
    kv = torch.tensor([[0, 3, 4]])
    out = p.mask_mod(torch.tensor(0), h, q, kv)
    assert out.tolist() == [[True, True, False], [False, True, False]]


def test_per_head_with_batch_patterns():
    docs = Documents(doc_ids=torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]]))
    p = PerHead((docs, docs & Causal(), Causal()))
    assert p.num_heads == 3 and p.batch_size == 2
    dense = assert_spans_match(p, 6, 6, ((1, 1), (2, 4)))
    assert dense.shape == (2, 3, 6, 6)
    assert_pairwise(p, 6, 6)
    assert (p & Dilated(1, 2)).num_heads == 3


@SETTINGS
@given(st.lists(st.sampled_from(["causal", "dilated", "block", "halo", "global"]),
                min_size=1, max_size=5), st.integers(3, 30), block_sizes())
def test_per_head_random(kinds, n, blocks):
    make = {"causal": Causal(), "dilated": Dilated(2, 2), "block": BlockLocal(4),
            "halo": Halo(3, 2), "global": GlobalTokens(1) | SlidingWindow(1, 1)}
    parts = [make[k] for k in kinds]
    dense = assert_spans_match(PerHead(parts), n, n, blocks)
    for h, part in enumerate(parts):
        assert torch.equal(dense[0, h], part.dense_mask(n, n)[0, 0])


def test_per_head_errors():
    with pytest.raises(PatternError, match=r"PerHead\.patterns must be a non-empty tuple"):
        PerHead(())
    with pytest.raises(PatternError, match=r"PerHead\.patterns must be a non-empty tuple"):
        PerHead(Causal())
    with pytest.raises(PatternError, match=r"PerHead\.patterns\[1\] must be a Pattern, got int"):
        PerHead((Causal(), 3))
    with pytest.raises(PatternError, match=r"PerHead\.patterns\[0\] already differs per head"):
        PerHead((PerHead((Causal(),)),))
    a = Documents(doc_ids=torch.zeros(2, 4, dtype=torch.long))
    b = Documents(doc_ids=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(PatternError, match=r"disagree on batch size: \[2, 3\]"):
        PerHead((a, b))
    with pytest.raises(PatternError, match=r"disagree on head count: \[1, 2\]"):
        (PerHead((Causal(), Causal())) & PerHead((Causal(),))).num_heads


@st.composite
def cswin_args(draw):
    grid = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    stripe = draw(st.integers(1, min(grid)))
    heads = 2 * draw(st.integers(1, 3))
    return grid, stripe, heads


@SETTINGS
@given(cswin_args(), block_sizes())
def test_cross_shaped_window(args, blocks):
    grid, stripe, heads = args
    p = CrossShapedWindow(stripe, grid, heads)
    n = math.prod(grid)
    dense = assert_spans_match(p, n, n, blocks)
    assert dense.shape == (1, heads, n, n)
    cells = grid_coords(grid)
    rows = from_pairs(n, n, lambda q, kv: cells[q][0] // stripe == cells[kv][0] // stripe)
    cols = from_pairs(n, n, lambda q, kv: cells[q][1] // stripe == cells[kv][1] // stripe)
    for h in range(heads):
        assert torch.equal(dense[0, h], rows if h < heads // 2 else cols)
    assert_spans_match(p & Causal(), n, n, blocks)
    if n > 1:
        assert_spans_match(p | GlobalTokens(1), n, n, blocks)


def test_cross_shaped_window_pairwise_and_errors():
    assert_pairwise(CrossShapedWindow(2, (3, 4), 4), 12, 12)
    with pytest.raises(PatternError, match=r"CrossShapedWindow\.heads=3 must be even"):
        CrossShapedWindow(2, (8, 8), 3)
    with pytest.raises(PatternError, match=r"CrossShapedWindow\.heads must be an integer >= 2"):
        CrossShapedWindow(2, (8, 8), 0)
    with pytest.raises(PatternError, match=r"CrossShapedWindow\.stripe=9 exceeds the grid side 8"):
        CrossShapedWindow(9, (8, 10), 2)
    with pytest.raises(PatternError, match=r"CrossShapedWindow\.stripe must be an integer >= 1"):
        CrossShapedWindow(0, (8, 8), 2)
    with pytest.raises(PatternError, match=r"CrossShapedWindow\.grid must be a 2-D tuple"):
        CrossShapedWindow(2, (8, 8, 8), 2)


# -- mixed combinations on grids ----------------------------------------------------------------


@SETTINGS
@given(swin_args(), st.integers(0, 1), block_sizes())
def test_grid_pattern_combinations(args, axis, blocks):
    grid, window, shift = args
    n = math.prod(grid)
    sw = ShiftedWindow(window, shift, grid=grid)
    ax = Axial(grid, axis)
    bl = BlockLocal(window, grid=grid)
    for combo in (sw | ax, sw & ax, (sw | bl) & Causal(), PerHead((sw, ax, bl, sw | ax))):
        assert_spans_match(combo, n, n, blocks)


def test_mask_mods_run_under_vmap():
    """FlexAttention evaluates ``mask_mod`` on scalar tensors under vmap: no Python branching on data."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    cases = [
        Neighborhood((3, 4), dilation=(2, 1), stride=(2, 3), causal=(False, True), grid=(7, 9)),
        ShiftedWindow(3, 1, grid=(5, 7)), Axial((3, 4, 5), 1), Halo((2, 3), 1, grid=(5, 7)),
        (GlobalTokens(2) | SlidingWindow(1, 1)) & Dilated(3, 1),
        PerHead((Causal(), Dilated(1, 2), BlockLocal(3), Halo(3, 1))),
        CrossShapedWindow(2, (5, 6), 4),
    ]
    for p in cases:
        n = math.prod(p.grid) if getattr(p, "grid", None) else 30
        heads = p.num_heads or 1
        got = flex.create_mask(lambda b, h, q, kv: p.mask_mod(b, h, q, kv), 1, heads, n, n,
                               device="cpu")
        assert torch.equal(got, p.dense_mask(n, n).expand(1, heads, n, n)), p


@pytest.mark.parametrize("pattern", [
    Neighborhood(7, grid=(20, 30)), Neighborhood((3, 5), dilation=(2, 1), causal=(True, False), grid=(12, 14)),
    Neighborhood(3, grid=(4, 5, 6)), Neighborhood(5, stride=2, grid=(11, 13)), ShiftedWindow(4, shift=2, grid=(12, 16)),
    Axial((12, 14), axis=1), Axial((4, 5, 6), axis=0), BlockLocal((3, 5), grid=(12, 14)), Halo(4, 2, grid=(12, 16)),
    CrossShapedWindow(3, (12, 14), heads=4)], ids=repr)
def test_box_key_counts_equal_the_spans_counts(pattern):
    """Grid patterns count a query's keys as the product of per-axis counts (no spans built):
    the same numbers as counting their spans."""
    n = math.prod(pattern.grid)
    assert torch.equal(pattern.key_counts(n, n), Pattern.key_counts(pattern, n, n))
