"""TopK's fused choice: the native kernel makes each block of rows' q . k itself and selects from
it (``top_keys_of_products``), against float64 scores and against the unfused path, in float32,
bfloat16 and float16."""

from __future__ import annotations

import pytest
import torch

from multihead.backends import native
from multihead.backends.native import select
from multihead.patterns import Causal, Full, KeyPadding, SlidingWindow, TopK

needs_kernel = pytest.mark.skipif(native.kernel() is None, reason="native kernel not built")
NEG = float("-inf")


def _allowed(start, end, rows, n):
    """(B', H', rows, n): inside one of each row's intervals [start, end)."""
    keys = torch.arange(n)
    inside = (keys >= start.unsqueeze(-1)) & (keys < end.unsqueeze(-1))  # (B', H', rows, I, n)
    return inside.any(-2)


def _assert_keeps_largest(q, k, keep, indices, valid, allowed=None):
    """Each row keeps distinct keys in ascending order whose float64 scores are the row's ``keep``
    largest (up to fp32 rounding: among near-equal scores at the cut either may go), valid exactly
    where the key is allowed."""
    group = q.shape[1] // k.shape[1]
    scores = q.double() @ k.double().repeat_interleave(group, 1).transpose(-2, -1)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, NEG)
    assert indices.shape == valid.shape == scores.shape[:-1] + (keep,)
    assert (indices[..., 1:] > indices[..., :-1]).all()
    got = scores.gather(-1, indices)
    want = scores.topk(keep, -1).values
    floor = lambda t: t.clamp_min(-1e30).sort(-1).values  # noqa: E731
    torch.testing.assert_close(floor(got), floor(want), atol=1e-4, rtol=1e-5)
    assert torch.equal(valid, got > NEG)


def _choose(q, k, keep, start=None, end=None, screen_keys=None):
    shape = q.shape[:3] + (keep,)
    indices, valid = torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.bool)
    select.top_keys_of_products(q, k, keep, start, end, indices, valid, screen_keys)
    return indices, valid


@needs_kernel
@pytest.mark.parametrize("rows,n,d", [(1, 1, 4), (7, 33, 15), (70, 1000, 64), (130, 4100, 40), (9, 31, 1)])
@pytest.mark.parametrize("keep", [1, 5, 31])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_choice_keeps_the_largest_products(rows, n, d, keep, heads, kv_heads, dtype):
    """Row counts that are and are not multiples of the kernel's 8-row groups and 64-row blocks,
    key counts that do not fill the last 32-key panel, depths down to 1 and odd ones (a bf16 pair
    half empty), a head group sharing keys; bf16 and fp16 scores summed in float32, not rounded."""
    if keep > n:
        pytest.skip("keep is at most the keys")
    gen = torch.Generator().manual_seed(rows * 7 + n + d)
    q = torch.randn(2, heads, rows, d, generator=gen).to(dtype)
    k = torch.randn(2, kv_heads, n, d, generator=gen).to(dtype)
    _assert_keeps_largest(q, k, keep, *_choose(q, k, keep))


@needs_kernel
def test_fused_choice_within_intervals():
    """Per-row intervals (several per row, overlapping, out of range, empty, broadcast over batch
    and heads), rows with fewer allowed keys than ``keep`` and rows with none: only allowed keys are
    valid, the rest fill up with invalid ones."""
    gen = torch.Generator().manual_seed(3)
    rows, n, keep = 40, 90, 6
    q, k = torch.randn(2, 4, rows, 16, generator=gen), torch.randn(2, 2, n, 16, generator=gen)
    start = torch.randint(-10, n + 5, (1, 4, rows, 3), generator=gen)
    end = start + torch.randint(-3, 30, (1, 4, rows, 3), generator=gen)
    end[0, 0, 0], end[0, 1, 1, 0], start[0, 1, 1, 1:], end[0, 1, 1, 1:] = start[0, 0, 0], start[0, 1, 1, 0] + 2, 5, 6
    allowed = _allowed(start, end, rows, n)
    assert not allowed[0, 0, 0].any() and allowed[0, 1, 1].sum() == 3  # a row with none, one with 3 < keep
    indices, valid = _choose(q, k, keep, start, end)
    _assert_keeps_largest(q, k, keep, indices, valid, allowed.expand(2, 4, rows, n))
    assert not valid[:, 0, 0].any() and valid[:, 1, 1].sum(-1).tolist() == [3, 3]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_choice_skips_the_keys_no_row_of_a_block_may_see(dtype):
    """Causal and banded intervals over many 64-row blocks: each block makes only the panels its
    rows may see, and what the thread's buffer held from an earlier block at the others (logits
    of other rows) is never chosen."""
    gen = torch.Generator().manual_seed(6)
    rows, n, keep = 300, 1000, 8
    q = torch.randn(1, 2, rows, 32, generator=gen).to(dtype)
    k = torch.randn(1, 2, n, 32, generator=gen).to(dtype)
    i = torch.arange(rows).view(1, 1, rows, 1)
    causal = (torch.zeros_like(i), i * 3 + 1)
    band = (i * 3 - 40, i * 3 + 40)
    for start, end in (causal, band, (torch.cat([band[0], 999 - i], -1), torch.cat([band[1], 1000 - i], -1))):
        allowed = _allowed(start, end, rows, n).expand(1, 2, rows, n)
        _assert_keeps_largest(q, k, keep, *_choose(q, k, keep, start, end), allowed)


@needs_kernel
def test_fused_choice_equals_selection_from_logits_on_nan_and_strided_input():
    """A query row with a NaN makes its scores NaN: the row is ranked as ``torch.topk`` ranks it,
    exactly as the unfused selection does; strided q (a slice of rows) and k (not contiguous rows)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 50, 24, generator=gen)[:, :, 5:45]
    k = torch.randn(1, 2, 24, 70, generator=gen).transpose(-2, -1)
    q[0, 1, 3, 7] = float("nan")
    indices, valid = _choose(q, k, 9)
    want = select.top_keys(q @ k.transpose(-2, -1), 9)
    assert torch.equal(indices[0, 1, 3], want[0][0, 1, 3]) and torch.equal(valid[0, 1, 3], want[1][0, 1, 3])
    _assert_keeps_largest(q[:, :1], k[:, :1], 9, indices[:, :1], valid[:, :1])
    others = [r for r in range(40) if r != 3]
    _assert_keeps_largest(q[:, 1:, others], k[:, 1:], 9, indices[:, 1:, others], valid[:, 1:, others])


@needs_kernel
@pytest.mark.parametrize("keep", [5, 40])
def test_fused_choice_ranks_infinite_products(keep):
    """A key with an infinite element makes products of +inf (chosen first) and -inf (never
    valid; with keep = every key, kept last as invalid): as float64 scores rank them."""
    gen = torch.Generator().manual_seed(15)
    q, k = torch.randn(1, 2, 20, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    k[0, 0, 9, 2] = float("inf")
    indices, valid = _choose(q, k, keep)
    _assert_keeps_largest(q, k, keep, indices, valid)
    positive = q[0, 0, :, 2] > 0
    assert (indices[0, 0] == 9).any(-1).tolist() == (positive | (keep == 40)).tolist()
    assert valid[0, 0][indices[0, 0] == 9].tolist() == positive[(indices[0, 0] == 9).any(-1)].tolist()


@needs_kernel
def test_fused_choice_refuses_bad_input():
    ext = native.kernel()
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 20, 16)
    out = torch.empty(1, 4, 8, 3, dtype=torch.long), torch.empty(1, 4, 8, 3, dtype=torch.bool)
    none = torch.empty(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match="multiple of H_kv"):
        ext.top_keys_of_products(q, torch.randn(1, 3, 20, 16), 3, none, none, *out, -1, "auto")
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ext.top_keys_of_products(q.double(), k.double(), 3, none, none, *out, -1, "auto")
    with pytest.raises(RuntimeError, match="of one type"):
        ext.top_keys_of_products(q, k.bfloat16(), 3, none, none, *out, -1, "auto")
    with pytest.raises(RuntimeError, match="keep must be"):
        ext.top_keys_of_products(q, k, 21, none, none, *out, -1, "auto")
    with pytest.raises(RuntimeError, match="shape"):
        ext.top_keys_of_products(q, k, 4, none, none, *out, -1, "auto")
    with pytest.raises(RuntimeError, match="span"):
        ext.top_keys_of_products(q, k, 3, torch.zeros(1, 4, 7, 1, dtype=torch.long),
                                 torch.zeros(1, 4, 7, 1, dtype=torch.long), *out, -1, "auto")


@needs_kernel
@pytest.mark.parametrize("within", ["full", "causal", "window", "padding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_runs_the_fused_choice_and_keeps_what_the_unfused_one_keeps(monkeypatch, within, dtype):
    """``TopK.resolve`` on CPU input chooses through the fused kernel (one call for every row: no
    chunks, no logits in memory), and keeps what the logits-then-select path keeps (as scores, up to rounding; in bf16
    that path rounds the logits to bf16 first, so only the fused choice is held to float64)."""
    gen = torch.Generator().manual_seed(5)
    n = 200
    q, k = (torch.randn(2, h, n, 16, generator=gen).to(dtype) for h in (4, 2))
    pattern = {"full": Full(), "causal": Causal(), "window": SlidingWindow(20, 5),
               "padding": KeyPadding(torch.arange(n).expand(2, n) >= torch.tensor([[n], [n - 30]]))}[within]
    calls = []
    fused = select.top_keys_of_products
    monkeypatch.setattr(select, "top_keys_of_products", lambda *a: calls.append(a) or fused(*a))
    got = TopK(7).resolve(q, k, 0.25, pattern).pattern
    assert len(calls) == 1
    monkeypatch.setattr(select, "fused_choice", lambda q, k: False)
    want = TopK(7).resolve(q, k, 0.25, pattern).pattern
    allowed = pattern.dense_mask(n, n).expand(2, 4, n, n)
    for chosen in (got, want) if dtype == torch.float32 else (got,):
        _assert_keeps_largest(q, k, 7, chosen.indices, chosen.valid, allowed)


def _both_ways(q, k, keep, by, start=None, end=None):
    """The choice plain and screened by ``by`` products (forced at any size): (plain, screened,
    ``Screened``)."""
    plain = _choose(q, k, keep, start, end, screen_keys=-1)
    shape = q.shape[:3] + (keep,)
    indices, valid = torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.bool)
    screened = select.top_keys_of_products(q, k, keep, start, end, indices, valid, screen_keys=0, screen_by=by)
    return plain, (indices, valid), screened


def _screened(by: str, rows: int) -> select.Screened:
    """What a forced screen by ``by`` reports on finite rows: all rows where the build has it."""
    return select.Screened(rows, by) if by in select.screens() else select.Screened(0, "")


SCREENS = pytest.mark.parametrize("by", ["int8", "bf16"])


@needs_kernel
@SCREENS
@pytest.mark.parametrize("rows,n,d", [(1, 40, 1), (7, 33, 15), (70, 1000, 64), (130, 2100, 40), (9, 300, 80),
                                      (20, 64, 17), (6, 90, 6)])
@pytest.mark.parametrize("keep", [1, 5, 31])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)])
def test_screened_choice_keeps_the_plain_choices_keys(rows, n, d, keep, heads, kv_heads, by):
    """float32 rows ranked by int8 or bf16 products first, then the keys within the error bound of
    the cut scored again in float32: the same indices and validity as the plain float32 choice, to
    the bit (depths that are and are not multiples of the 16-element transposes, of int8 quads
    and of bf16 pairs)."""
    gen = torch.Generator().manual_seed(rows + n + d + keep)
    q, k = torch.randn(2, heads, rows, d, generator=gen), torch.randn(2, kv_heads, n, d, generator=gen)
    plain, screened, how = _both_ways(q, k, keep, by)
    assert how == _screened(by, 2 * heads * rows)
    assert torch.equal(plain[0], screened[0]) and torch.equal(plain[1], screened[1])


@needs_kernel
@SCREENS
@pytest.mark.parametrize("case", ["near_ties", "exact_ties", "tiny", "subnormal", "large", "one_large_key",
                                  "outlier_element", "zero_rows"])
def test_screened_choice_holds_on_hard_scores(case, by):
    """Scores whose differences at the cut are below bf16's resolution (keys that are copies of one
    key up to 1e-4), exact ties (small integers: the first keys at the cut go, as in the plain
    path), magnitudes from subnormal to 1e15 (int8 scales whose products are subnormal), one key
    whose norm widens every row's bound, an element that widens its row's int8 step, and rows and
    keys of zeros."""
    gen = torch.Generator().manual_seed(11)
    rows, n, d, keep = 40, 700, 32, 12
    q, k = torch.randn(1, 2, rows, d, generator=gen), torch.randn(1, 2, n, d, generator=gen)
    if case == "near_ties":
        k = k[:, :, :1] + 1e-4 * k
    elif case == "exact_ties":
        q, k = torch.randint(-2, 3, q.shape, generator=gen).float(), torch.randint(-2, 3, k.shape, generator=gen).float()
    elif case == "tiny":
        q, k = q * 1e-19, k * 1e-19
    elif case == "subnormal":
        k = k * 1e-39
    elif case == "large":
        q, k = q * 1e15, k * 1e3
    elif case == "one_large_key":
        k[0, 1, 5] *= 1e4
    elif case == "outlier_element":
        q[..., 3] *= 100
        k[..., 7] *= 100
    else:
        q[0, 0, ::3], k[0, 1, ::5] = 0, 0
    plain, screened, how = _both_ways(q, k, keep, by)
    assert how == _screened(by, 2 * rows)
    assert torch.equal(plain[0], screened[0]) and torch.equal(plain[1], screened[1])
    if case == "near_ties":  # the bf16 products alone rank these keys otherwise
        approx = _choose(q.bfloat16(), k.bfloat16(), keep)[0]
        assert not torch.equal(approx, plain[0])


@needs_kernel
@SCREENS
def test_screened_choice_within_intervals(by):
    """Causal, banded and scattered intervals, rows with fewer allowed keys than ``keep`` and with
    none: the same keys and validity as the plain choice."""
    gen = torch.Generator().manual_seed(12)
    rows, n, keep = 150, 600, 9
    q, k = torch.randn(1, 4, rows, 24, generator=gen), torch.randn(1, 2, n, 24, generator=gen)
    i = torch.arange(rows).view(1, 1, rows, 1)
    scattered = torch.randint(-10, n + 5, (1, 4, rows, 3), generator=gen)
    for start, end in ((torch.zeros_like(i), i * 4 + 1), (i * 4 - 6, i * 4 + 6),
                       (scattered, scattered + torch.randint(-3, 40, (1, 4, rows, 3), generator=gen))):
        plain, screened, how = _both_ways(q, k, keep, by, start, end)
        assert how == _screened(by, 4 * rows)
        assert torch.equal(plain[0], screened[0]) and torch.equal(plain[1], screened[1])
        assert (~plain[1]).any()  # some row saw fewer than keep keys


@needs_kernel
@pytest.mark.parametrize("by", ["auto", "int8", "bf16"])
@pytest.mark.parametrize("bad", ["nan_q", "inf_k", "huge"])
def test_screened_choice_falls_back_where_no_bound_holds(bad, by):
    """A NaN or inf in q or k, or products near float32's range, have no finite error bound: the
    call runs the plain choice (nothing screened) and ranks as it does."""
    gen = torch.Generator().manual_seed(13)
    q, k = torch.randn(1, 2, 30, 16, generator=gen), torch.randn(1, 2, 200, 16, generator=gen)
    if bad == "nan_q":
        q[0, 1, 3, 7] = float("nan")
    elif bad == "inf_k":
        k[0, 0, 9, 2] = float("inf")
    else:
        q, k = q * 1e19, k * 1e19
    plain, screened, how = _both_ways(q, k, 5, by)
    assert how == select.Screened(0, "")
    assert torch.equal(plain[0], screened[0]) and torch.equal(plain[1], screened[1])


@needs_kernel
def test_auto_screen_takes_int8_unless_outliers_widen_its_bound():
    """"auto" screens Gaussian rows by int8 products (their bound about 1.8 x the bf16 one), and
    rows with an element at 40 x the others' scale (its int8 bound about 4.7 x) by bf16 products;
    the same keys."""
    gen = torch.Generator().manual_seed(17)
    q, k = torch.randn(1, 2, 50, 64, generator=gen), torch.randn(1, 2, 600, 64, generator=gen)
    outlying_q, outlying_k = q.clone(), k.clone()
    outlying_q[..., 0] *= 40
    outlying_k[..., 0] *= 40
    have = select.screens()
    fallback = "bf16" if "bf16" in have else ""  # where int8's bound is too wide, or there is no int8
    for rows, keys, want in ((q, k, "int8" if "int8" in have else fallback), (outlying_q, outlying_k, fallback)):
        plain, screened, how = _both_ways(rows, keys, 7, "auto")
        assert how == (select.Screened(2 * 50, want) if want else select.Screened(0, ""))
        assert torch.equal(plain[0], screened[0]) and torch.equal(plain[1], screened[1])


def test_screen_by_is_checked():
    ext = native.kernel()
    if ext is None:
        pytest.skip("no kernel")
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 20, 16)
    out = torch.empty(1, 2, 8, 3, dtype=torch.long), torch.empty(1, 2, 8, 3, dtype=torch.bool)
    none = torch.empty(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match="screen_by must be"):
        ext.top_keys_of_products(q, k, 3, none, none, *out, 0, "fp8")


@needs_kernel
def test_topk_screens_long_float32_rows_only(monkeypatch):
    """``TopK.resolve`` screens float32 rows that see ``SCREEN_KEYS`` keys or more and
    ``SCREEN_RATIO`` x k or more, and none below either; the choice is the same either way."""
    gen = torch.Generator().manual_seed(14)
    q, k = torch.randn(1, 2, 64, 16, generator=gen), torch.randn(1, 2, 512, 16, generator=gen)
    counts = []
    fused = select.top_keys_of_products
    monkeypatch.setattr(select, "top_keys_of_products", lambda *a: counts.append(fused(*a)) or counts[-1])
    plain = TopK(8).resolve(q, k, 1.0, Full()).pattern
    monkeypatch.setattr(select, "SCREEN_KEYS", 512)
    screened = TopK(8).resolve(q, k, 1.0, Full()).pattern
    narrow = TopK(8).resolve(q, k, 1.0, SlidingWindow(100, 100)).pattern
    TopK(512 // select.SCREEN_RATIO + 1).resolve(q, k, 1.0, Full())  # too many kept for 512 keys
    assert [c.rows for c in counts] == [0, 2 * 64 if select.screens() else 0, 0, 0]
    assert torch.equal(plain.indices, screened.indices) and torch.equal(plain.valid, screened.valid)
    assert narrow.valid.all()


@needs_kernel
def test_explain_says_how_topk_chose(monkeypatch):
    """``multihead.explain`` says how a dynamic pattern was resolved for this input: the kernel's
    choice and how many rows it screened, or the unfused one; nothing for a static pattern."""
    import multihead as mh

    gen = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(1, 2, 2048, 16, generator=gen) for _ in range(3))
    fused = mh.explain(q, k, v, pattern=TopK(8), show=False)
    have = select.screens()
    if have:
        assert f"4096 of 4096 rows ranked by {have[0]} products first, then rescored" in fused.pattern
    assert fused.pattern.startswith("TopK(k=8): chosen by the native kernel") and ("ranked" in fused.pattern) == bool(have)
    assert f"pattern: {fused.pattern}" in str(fused).splitlines()[1]
    small = mh.explain(q[:, :, :64], k[:, :, :64], v[:, :, :64], pattern=TopK(8) & Causal(), show=False)
    assert small.pattern == "TopK(k=8): chosen by the native kernel"  # too few keys to screen
    monkeypatch.setattr(select, "fused_choice", lambda q, k: False)
    unfused = mh.explain(q, k, v, pattern=TopK(8), backend="blocksparse", show=False)
    assert "torch.matmul" in unfused.pattern
    static = mh.explain(q, k, v, pattern=Causal(), show=False)
    assert static.pattern == "" and "pattern:" not in str(static)
