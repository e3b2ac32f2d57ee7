"""The native CPU kernel of the block-sparse backend: that it is built and runs, equals the float64
reference (forward and gradients) for patterns x scores x topologies x dtypes, passes gradcheck in
float64, survives property tests over shapes, windows, grids and block sizes, rejects a corrupt
tile table, and that with the kernel disabled the PyTorch tiles take over and explain says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import multihead as mh
from multihead.backends import native
from multihead.backends.blocksparse import BlockSparseBackend
from multihead.backends.native import tiles
from multihead.backends.native.function import dropout_mask, native_attention
from multihead.backends.native.select import top_keys
from multihead.nn.prototype_cross import KeyArgmax
from multihead.patterns import (Axial, Causal, CrossShapedWindow, Dilated, Documents, Full, KeySelection,
                                Neighborhood, PerHead, PrefixLM, Routing, ShiftedWindow, SlidingWindow, TopK)
from multihead.request import make_request
from multihead.scores import (ALiBi, DynamicPositionBias, RelativePositionBias, RelativePositionBias2d, ScoreChain,
                              Softcap)

from conftest import FLOOR, assert_within_tolerance, max_error, naive_attention, stable_seed

DISABLED = os.environ.get("MULTIHEAD_NATIVE", "1") == "0"
needs_kernel = pytest.mark.skipif(DISABLED, reason="MULTIHEAD_NATIVE=0: the kernel is disabled")


def _grid_patterns():
    return {
        "neighborhood_7x7": lambda: Neighborhood(7, grid=(12, 14)),
        "neighborhood_dilated_causal": lambda: Neighborhood((3, 5), dilation=(2, 1), causal=(True, False),
                                                            grid=(12, 14)),
        "neighborhood_3d": lambda: Neighborhood(3, grid=(4, 5, 6)),
        "swin": lambda: ShiftedWindow(4, shift=2, grid=(12, 16)),
        "axial": lambda: Axial((12, 14), axis=1),
        "cswin": lambda: CrossShapedWindow(2, grid=(12, 14), heads=4),
    }


PATTERNS = {
    "full": lambda n: Full(),
    "causal": lambda n: Causal(),
    "window": lambda n: SlidingWindow(9, 4),
    "dilated": lambda n: Dilated(5, 3),
    "prefix_causal": lambda n: PrefixLM(11),
    "documents": lambda n: Documents(torch.tensor([0, 40, 41, 100, n])) & Causal(),
    "per_head": lambda n: PerHead((SlidingWindow(3, 3), Causal(), Full(), SlidingWindow(20, 0))),
    "topk_causal": lambda n: TopK(8) & Causal(),
    "topk_in_window": lambda n: TopK(4) & SlidingWindow(16, 16),
    "routing": lambda n: Routing(3),  # clusters longer than a tile's 32 rows: tables of key runs
    "routing_causal": lambda n: Routing(5) & Causal(),  # runs with a triangular mask on their last keys
}
SCORES = {
    "none": lambda: None,
    "alibi": lambda: ALiBi(4),
    "t5_softcap": lambda: ScoreChain([RelativePositionBias(4, num_buckets=8, max_distance=20), Softcap(4.0)]),
    "softcap_then_alibi": lambda: ScoreChain([Softcap(3.0), ALiBi(4)]),
}


def _inputs(n, kv_heads, dtype, seed=0, d=16, batch=2, heads=4, dv=None):
    """q, k, v and an output gradient in float64; ``dv`` the values' width (``d`` unless given)."""
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, n, dv, generator=gen, dtype=torch.float64)
    dout = torch.randn(batch, heads, n, dv, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def _run(backend, q, k, v, dout, dtype, pattern, score, normalizer=None):
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    params = [] if score is None else list(score.parameters())
    for p in params:
        p.grad = None
    out = mh.attention(*leaves, pattern=pattern, score=score, normalizer=normalizer, backend=backend)
    if backend == "blocksparse":
        assert type(out.grad_fn).__name__ == "NativeBlockSparseBackward"
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves] + [p.grad.clone() for p in params]


def _naive(q, k, v, dout, dtype, pattern, score, normalizer=None):
    """The same attention computed densely in ``dtype``: the error the tolerance rule allows."""
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    params = [] if score is None else list(score.parameters())
    for p in params:
        p.grad = None
    out = naive_attention(*leaves, pattern=pattern, score=score, normalizer=normalizer)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves] + [p.grad.clone() for p in params]


def _check_against_reference(pattern, score, q, k, v, dout, dtype, normalizer=None):
    if getattr(pattern, "dynamic", False):  # one choice of keys for every dtype (no ties flipped)
        pattern = make_request(q, k, v, pattern=pattern).pattern
    want = _run("reference", q, k, v, dout, torch.float64, pattern, score.double() if score else None, normalizer)
    if score is not None:
        score.float()
    got = _run("blocksparse", q, k, v, dout, dtype, pattern, score, normalizer)
    base = _naive(q, k, v, dout, dtype, pattern, score, normalizer)
    for name, g, w, b in zip(["out", "dq", "dk", "dv", "dscore"], got, want, base):
        assert_within_tolerance(g, w, b, dtype, name)


def test_the_kernel_is_built_and_runs():
    """`make test` on a fresh clone builds the kernel and uses it (unless MULTIHEAD_NATIVE=0)."""
    if DISABLED:
        module, why = native.status()
        assert module is None and "MULTIHEAD_NATIVE=0" in why
        return
    module, why = native.status()
    assert module is not None, f"the native kernel is not available: {why}"
    q = torch.randn(1, 2, 64, 16, requires_grad=True)
    out = mh.attention(q, q, q, pattern=SlidingWindow(8, 8), backend="blocksparse")
    assert type(out.grad_fn).__name__ == "NativeBlockSparseBackward"
    assert "native kernel" in mh.explain(q, q, q, pattern=SlidingWindow(8, 8), show=False).reasons["blocksparse"]
    assert "available" in native.describe()


@needs_kernel
def test_the_multiply_add_rate_counts_every_thread_and_rejects_no_steps():
    """The benchmarks' yardstick of the cores' limit: a positive rate, and a clear error for no work."""
    module = native.kernel()
    assert module.multiply_add_rate(10_000) > 0
    with pytest.raises(RuntimeError, match="steps must be positive"):
        module.multiply_add_rate(0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("score_name", SCORES)
@pytest.mark.parametrize("pattern_name", PATTERNS)
def test_matches_reference(pattern_name, score_name, kv_heads, dtype):
    n = 131  # not a multiple of any block
    if pattern_name == "per_head" and kv_heads == 2:
        pytest.skip("a per-head pattern whose heads split a GQA group is served by heads, not here")
    q, k, v, dout = _inputs(n, kv_heads, torch.float64, seed=stable_seed(pattern_name, score_name))
    pattern, score = PATTERNS[pattern_name](n), SCORES[score_name]()
    _check_against_reference(pattern, score, q, k, v, dout, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("pattern_name", PATTERNS)
def test_sigmoid_matches_reference(pattern_name, kv_heads, dtype):
    """Sigmoid weights (sigmoid(logit + bias), no sum over the row) in the kernel, on lane tiles
    (windows, blocks) and row tiles (key lists), with a relative bias and a softcap."""
    n = 131
    q, k, v, dout = _inputs(n, kv_heads, torch.float64, seed=stable_seed("sigmoid", pattern_name))
    score = ScoreChain([ALiBi(4), Softcap(5.0)])
    _check_against_reference(PATTERNS[pattern_name](n), score, q, k, v, dout, dtype, mh.normalizers.Sigmoid())


@needs_kernel
@pytest.mark.parametrize("normalizer", [None, "sigmoid"], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("pattern_name", ["causal", "window", "documents", "per_head", "topk_in_window"])
def test_float16_matches_reference(pattern_name, kv_heads, normalizer):
    """float16 tiles: widened to float32 on load (products and softmax in float32), rounded once
    on store; lane and row tiles, GQA, softmax and sigmoid."""
    if pattern_name == "per_head" and kv_heads == 2:
        pytest.skip("a per-head pattern whose heads split a GQA group is served by heads, not here")
    n = 131
    q, k, v, dout = _inputs(n, kv_heads, torch.float64, seed=stable_seed("fp16", pattern_name))
    normalizer = mh.normalizers.Sigmoid() if normalizer else None
    _check_against_reference(PATTERNS[pattern_name](n), RelativePositionBias(4, num_buckets=8, max_distance=20),
                             q, k, v, dout, torch.float16, normalizer)


@needs_kernel
@pytest.mark.parametrize("pattern_name", list(_grid_patterns()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grid_patterns_match_reference(pattern_name, dtype):
    pattern = _grid_patterns()[pattern_name]()
    n = pattern.grid[0] * pattern.grid[1] if len(pattern.grid) == 2 else 4 * 5 * 6
    q, k, v, dout = _inputs(n, 2, torch.float64, seed=3)
    req = make_request(q.float(), k.float(), v.float(), pattern=pattern)
    backend = BlockSparseBackend()
    assert backend.native_unsupported(req) is None
    _check_against_reference(pattern, None, q, k, v, dout, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_masked_lane_blocks_that_span_two_heads_match_reference(kv_heads, dtype):
    """Tiles of 9 masked rows with the query heads of a key head stacked: a lane block holds the end
    of one head's rows and the start of the next's, each lane reading its own row's mask bytes."""
    pattern = Neighborhood(5, grid=(20, 20))
    q, k, v, dout = _inputs(400, kv_heads, torch.float64, seed=4)
    table = BlockSparseBackend().native_table(make_request(q.float(), k.float(), v.float(), pattern=pattern))
    rows = table.tile_q.diff()
    assert (rows % 16 != 0).all() and (table.tile_m >= 0).any()
    _check_against_reference(pattern, None, q, k, v, dout, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["swin_table", "neighborhood_dpb", "dilated_table_softcap", "table_mqa"])
def test_2d_relative_biases_run_in_the_kernel(case, dtype):
    """Swin's table and CrossFormer's DPB (2-D offsets on a grid, with dilation, under a softcap)
    are read inside the tiles through position codes: forward, q/k/v and the table's gradients
    equal the float64 reference."""
    grid = (10, 12)
    n = grid[0] * grid[1]
    pattern, score, kv_heads = {
        "swin_table": (ShiftedWindow(4, shift=2, grid=grid), RelativePositionBias2d(4, 4, grid=grid), 2),
        "neighborhood_dpb": (Neighborhood(5, grid=grid), DynamicPositionBias(4, 3, grid=grid, hidden=8), 4),
        "dilated_table_softcap": (Neighborhood(3, dilation=2, grid=grid),
                                  ScoreChain([RelativePositionBias2d(4, 3, grid=grid, dilation=2), Softcap(2.0)]), 4),
        "table_mqa": (Neighborhood(3, grid=grid), RelativePositionBias2d(4, 2, grid=grid), 1),
    }[case]
    for p in score.parameters():  # larger than the init, so that the bias matters
        p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    q, k, v, dout = _inputs(n, kv_heads, torch.float64, seed=4)
    why = BlockSparseBackend().native_unsupported(make_request(q.float(), k.float(), v.float(), pattern=pattern,
                                                               score=score))
    assert why is None, why
    _check_against_reference(pattern, score, q, k, v, dout, dtype)


def test_a_2d_bias_beside_other_terms_stays_on_the_torch_tiles():
    q = torch.randn(1, 4, 36, 8)
    req = make_request(q, q, q, pattern=Neighborhood(3, grid=(6, 6)),
                       score=ScoreChain([RelativePositionBias2d(4, 3, grid=(6, 6)), ALiBi(4)]))
    assert "2-D relative bias to other terms" in BlockSparseBackend().describe(req)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 40, 15], ids=["d64", "d40", "d15_odd"])
@pytest.mark.parametrize("pattern_name", ["window", "documents", "topk_causal"])
def test_widths_match_reference(pattern_name, d, dtype):
    """Head widths that take each branch of the row transposes (whole 16-wide chunks, a chunk and a
    masked tail) and of bfloat16's pair products (AVX-512 BF16: whole 32-wide value chunks, a chunk
    and a tail, and an odd width that keeps the fp32 products), on lane and row tiles."""
    n = 131
    q, k, v, dout = _inputs(n, 2, torch.float64, seed=d, d=d)
    _check_against_reference(PATTERNS[pattern_name](n), None, q, k, v, dout, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dv", [32, 96], ids=["v32", "v96"])
@pytest.mark.parametrize("pattern_name", ["window", "documents", "topk_causal"])
def test_values_narrower_or_wider_than_the_heads_match_reference(pattern_name, dv, dtype):
    """Values of another width than the queries and keys (64), on lane and row tiles: the row
    kernels' backward runs q . k and dO . v as separate products, not two at once."""
    n = 131
    q, k, v, dout = _inputs(n, 2, torch.float64, seed=dv, d=64, dv=dv)
    _check_against_reference(PATTERNS[pattern_name](n), None, q, k, v, dout, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("keys", [8, 96], ids=["short", "long"])
def test_key_lists_short_and_long_match_reference(keys, dtype):
    """One query per tile with 8 or 96 keys of 64 dimensions: the long lists (96 x 128 values,
    past ROW_PREFETCH_BYTES in fp32 and bf16) run without the next tile's prefetch, the short ones
    with it; both equal the reference."""
    n = 160
    q, k, v, dout = _inputs(n, 2, torch.float64, seed=stable_seed("lists", keys), d=64, batch=1, heads=2)
    _check_against_reference(TopK(keys), None, q, k, v, dout, dtype)


def _key_lists(batch, heads, q_len, kv_len, width, seed):
    """Distinct random keys per row, about a fifth of the slots invalid (padding), one valid at least."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(kv_len, generator=gen)[:width]
                           for _ in range(batch * heads * q_len)]).view(batch, heads, q_len, width)
    valid = torch.rand(batch, heads, q_len, width, generator=gen) > 0.2
    valid[..., 0] = True
    return indices, valid


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("d", [64, 72, 12])
@pytest.mark.parametrize("q_len", [5, 6, 7, 8])
def test_key_lists_in_groups_of_rows_match_reference(q_len, d, dtype):
    """The kernel sums the values of four key lists at once, four vectors of d at a time, then one,
    then the last few d a row at a time: 15, 18, 21 and 24 lists (three heads) leave a last group of
    3, 2, 1 and 4; padded lists mask their invalid slots."""
    q, k, v, dout = _inputs(q_len, 3, torch.float64, seed=stable_seed("groups", q_len, d), d=d, batch=1, heads=3)
    pattern = KeySelection(*_key_lists(1, 3, q_len, q_len, min(q_len, 5), seed=q_len), q_len)
    _check_against_reference(pattern, None, q, k, v, dout, dtype)


@needs_kernel
def test_a_key_list_with_no_valid_key_beside_live_ones():
    """A row whose slots are all invalid (``mh.attention`` refuses it under softmax; a table can
    still hold one) gets output 0 and lse +inf; the other rows of its group of four are computed one
    at a time and equal the rows computed four at a time."""
    q = torch.randn(1, 2, 8, 64)
    indices, valid = _key_lists(1, 2, 8, 8, 4, seed=3)
    ext = native.kernel()

    def run(valid):
        table = tiles.from_key_lists(indices, valid)
        return ext.forward(q, q, q, *table.arrays(), 0.125, None, None, None, None, 0.0, 7, 0.0, 0, None)

    out, lse = run(valid)
    dead = valid.clone()
    dead[0, 0, 1] = False
    out_dead, lse_dead = run(dead)
    assert torch.equal(out_dead[0, 0, 1], torch.zeros(64)) and lse_dead[0, 0, 1] == float("inf")
    rest = torch.ones(1, 2, 8, dtype=torch.bool)
    rest[0, 0, 1] = False
    torch.testing.assert_close(out_dead[rest], out[rest], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse_dead[rest], lse[rest], rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_key_lists_keep_their_invalid_slots_indices(dtype):
    """A table of key lists keeps each invalid slot's index (``KeySelection`` keeps it among the
    keys), masked: slots that repeat the row's valid keys change nothing, forward or backward."""
    n, width = 40, 6
    indices, valid = _key_lists(1, 2, n, n, width, seed=12)
    valid[..., 3:] = False
    repeated = torch.cat([indices[..., :3], indices[..., :3]], -1)  # invalid slots name the valid keys
    table = tiles.from_key_lists(repeated, valid)
    assert torch.equal(table.k_idx, repeated.reshape(2, n * width))
    q, k, v, dout = _inputs(n, 2, torch.float64, seed=13, batch=1, heads=2)
    _check_against_reference(KeySelection(repeated, valid, n), None, q, k, v, dout, dtype)


def _lists_backward(table, q, k, v, dout, scale):
    """The kernel's forward and backward on a tile table: (dq, dk, dv)."""
    ext = native.kernel()
    args = (*table.arrays(), scale, None, None, None, None, 0.0, q.shape[2] - 1, 0.0, 0, None)
    out, lse = ext.forward(q, k, v, *args)
    return ext.backward(q, k, v, out, dout, lse, *args, 1, False, False)[:3]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_key_lists_backward_skips_a_row_that_sees_no_key(dtype):
    """Key lists' backward sorts each head's pairs by key (``lists_backward``): a row whose slots
    are all invalid (lse +inf) gets dq 0 and adds nothing to dk and dv, which equal the reference's
    with that row's output gradient zeroed (its weights then drop out of every gradient)."""
    heads, kv_heads, n, d = 4, 2, 24, 16
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, heads, n, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, kv_heads, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(1, heads, n, d, generator=gen, dtype=torch.float64)
    indices, valid = _key_lists(1, heads, n, n, 6, seed=9)
    dead = valid.clone()
    dead[0, 3, 5] = False  # head 3 (key head 1), query 5: no key
    got = _lists_backward(tiles.from_key_lists(indices, dead), *(t.to(dtype) for t in (q, k, v, dout)), 0.25)
    assert torch.equal(got[0][0, 3, 5], torch.zeros(d, dtype=dtype))
    quiet = dout.clone()
    quiet[0, 3, 5] = 0
    allowed = torch.zeros(1, heads, n, n, dtype=torch.bool)
    allowed.scatter_(3, indices, valid)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=allowed, scale=0.25, enable_gqa=True)
    ref.backward(quiet)
    for name, g, leaf in zip("qkv", got, leaves):
        assert max_error(g.double(), leaf.grad) <= FLOOR[dtype], f"d{name}"


@needs_kernel
def test_key_lists_backward_is_the_same_for_any_number_of_threads():
    """Each key's pairs are summed in the order of their rows whatever the threads' shares of the
    rows: the gradients are bitwise equal for 1, 2 and 3 threads."""
    gen = torch.Generator().manual_seed(10)
    q, k, v, dout = (torch.randn(2, 3, 70, 16, generator=gen) for _ in range(4))
    table = tiles.from_key_lists(*_key_lists(2, 3, 70, 70, 9, seed=11))
    threads = torch.get_num_threads()
    try:
        runs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            runs.append(_lists_backward(table, q, k, v, dout, 0.25))
    finally:
        torch.set_num_threads(threads)
    for grads in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], grads))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 40, 15], ids=["d64", "d40", "d15_odd"])
def test_every_lane_tile_height_matches_reference(d, dtype):
    """Tiles of 8 to 32 query rows: the weighted values of one lane block (a vector of d at a time,
    or bf16 pairs on AVX-512 BF16) and of two (six rows at a time, then a tail of one to five rows)
    written straight into the output and dQ rows; whole 64-wide chunks of d, single vectors and a
    masked tail."""
    n = 80
    q, k, v, dout = _inputs(n, 4, torch.float64, seed=d, d=d, batch=1)
    pattern = SlidingWindow(24, 6)
    want = _run("reference", q, k, v, dout, torch.float64, pattern, None)
    base = _naive(q, k, v, dout, dtype, pattern, None)
    for rows in range(8, 33):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
        out = BlockSparseBackend(q_block=rows, kv_block=8).forward(make_request(*leaves, pattern=pattern))[0]
        assert type(out.grad_fn).__name__ == "NativeBlockSparseBackward"
        out.backward(dout.to(dtype))
        got = [out.detach()] + [t.grad for t in leaves]
        for name, g, w, b in zip(["out", "dq", "dk", "dv"], got, want, base):
            assert_within_tolerance(g, w, b, dtype, f"{rows} rows, {name}")


def test_bfloat16_pair_products_are_built_where_the_cpu_has_them():
    """On a CPU with AVX-512 BF16 the kernel multiplies bfloat16 in pairs (and says so)."""
    if DISABLED:
        pytest.skip("MULTIHEAD_NATIVE=0: the kernel is disabled")
    flags = native.cpu_flags()
    expected = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "avx512_bf16"} <= flags
    assert native.kernel().bf16_pairs() == expected
    assert ("bf16 pair products" in native.describe()) == expected


def test_the_cpu_is_named_with_its_family_and_model(monkeypatch):
    """Benchmarks record the CPU by name, family and model (Zen 4 and Zen 5 share "AMD EPYC" and
    differ twofold in AVX-512 multiply-adds); flags and name come from the first processor."""
    info = {"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "fpu avx2 avx512f"}
    monkeypatch.setattr(native, "_cpuinfo", lambda: info)
    assert native.cpu_name() == "AMD EPYC, family 26 model 2"
    assert native.cpu_flags() == {"fpu", "avx2", "avx512f"}
    monkeypatch.setattr(native, "_cpuinfo", lambda: {})
    assert native.cpu_name() == "" and native.cpu_flags() == set()
    if native.status()[0] is not None:
        assert " on AMD EPYC" not in native.describe()


def test_cpuinfo_reads_the_first_processor():
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo")
    first = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                 if ":" in line)
    first = {key.strip(): value.strip() for key, value in first.items()}
    assert native.cpu_flags() == set(first.get("flags", "").split())
    assert native.cpu_name().startswith(first.get("model name", ""))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_a_key_listed_twice_keeps_every_gradient_update(dtype):
    """A gathered tile may name one key twice (padding, masked out): the key and value gradients
    of that key, accumulated a few keys at a time, must keep every update."""
    rows, d = 16, 8
    keys = torch.tensor([3, 0, 5, 0, 0, 7, 3, 9])  # 0 and 3 repeated, the repeats masked
    allowed = torch.ones(len(keys), rows, dtype=torch.uint8)  # keys x rows
    allowed[[3, 4, 6]] = 0
    table = tiles.TileTable(q_rows=torch.arange(rows), tile_q=torch.tensor([0, rows]),
                            tile_k=torch.tensor([0, len(keys)]), k_idx=keys.view(1, -1),
                            tile_m=torch.zeros(1, dtype=torch.long),
                            mask=allowed.reshape(1, -1), lb=1, lh=1, pairs=rows * len(keys))
    gen = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(1, 1, rows, d, generator=gen, dtype=torch.float64) for _ in range(4))
    dense = torch.zeros(rows, rows, dtype=torch.bool)
    dense[:, keys.unique()] = True
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    native_attention(table, *leaves, 0.5, None).backward(dout.to(dtype))
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*ref, attn_mask=dense, scale=0.5).backward(dout)
    for name, got, want in zip("qkv", leaves, ref):
        assert max_error(got.grad, want.grad) <= FLOOR[dtype], f"d{name}"


def _with_dropout_mask(pattern, score, q, k, v, dout, dtype, p, seed, normalizer=None):
    """Forward and gradients of dense attention in ``dtype`` whose weights (softmax, or
    ``normalizer``'s) are multiplied by the kernel's dropout factors for ``seed``
    (``dropout_mask``), in float64 when dtype is float64."""
    keep = dropout_mask(seed, p, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    req = make_request(*leaves, pattern=pattern, score=score)
    groups = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(groups, dim=1) for t in leaves[1:])
    logits = (leaves[0] @ kk.transpose(-1, -2)).float() * req.scale
    if score is not None:
        logits = score.apply_dense(logits, k.shape[2])
    allowed = req.pattern.dense_mask(q.shape[2], k.shape[2])
    logits = logits.masked_fill(~allowed, float("-inf"))
    weights = (normalizer.weights(logits, k.shape[2]) if normalizer else torch.softmax(logits, -1)).nan_to_num(0.0)
    out = (weights * keep / (1 - p)).to(dtype) @ vv
    out.backward(dout.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("pattern_name", ["window", "documents", "topk_in_window", "neighborhood"])
@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_dropout_matches_the_masked_reference(sigmoid, pattern_name, kv_heads, dtype):
    """Dropout in the kernel is the weights (softmax or sigmoid) times ``dropout_mask`` / (1 - p),
    forward and gradients, on lane tiles (windows, grids) and row tiles (key lists), under the
    tolerance rule; backward regenerates the forward's mask."""
    n, p, seed = 131, 0.3, 1234
    pattern = (Neighborhood(3, grid=(11, 12)) if pattern_name == "neighborhood" else PATTERNS[pattern_name](n))
    n = 132 if pattern_name == "neighborhood" else n
    q, k, v, dout = _inputs(n, kv_heads, torch.float64, seed=7)
    pattern = make_request(q, k, v, pattern=pattern).pattern  # top-k: one choice of keys
    score = ALiBi(4)
    torch.manual_seed(0)
    drawn = int(torch.randint(0, 2 ** 31, ()).item())
    torch.manual_seed(0)
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    normalizer = mh.normalizers.Sigmoid() if sigmoid else None
    out = mh.attention(*leaves, pattern=pattern, score=score, dropout=p, normalizer=normalizer, backend="blocksparse")
    assert type(out.grad_fn).__name__ == "NativeBlockSparseBackward"
    out.backward(dout.to(dtype))
    got = [out.detach()] + [t.grad for t in leaves]
    want = _with_dropout_mask(pattern, score.double(), q, k, v, dout, torch.float64, p, drawn, normalizer)
    base = _with_dropout_mask(pattern, score.float(), q, k, v, dout, dtype, p, drawn, normalizer)
    for name, g, w, b in zip(["out", "dq", "dk", "dv"], got, want, base):
        assert_within_tolerance(g, w, b, dtype, name)


def test_dropout_mask_keeps_one_minus_p_independently():
    """The hash keeps a fraction 1 - p of the pairs, with no pattern along rows, keys or heads."""
    keep = dropout_mask(99, 0.25, 2, 4, 256, 256).double()
    assert abs(keep.mean().item() - 0.75) < 0.005
    assert (keep.mean(dim=(2, 3)) - 0.75).abs().max() < 0.01  # every (batch, head)
    for dim in (2, 3):  # every query row, every key column (256 draws each)
        assert (keep.mean(dim=dim) - 0.75).abs().max() < 0.15
    assert (keep[..., 1:] == keep[..., :-1]).double().mean() < 0.65  # neighbours agree as by chance (0.625)
    assert not torch.equal(dropout_mask(99, 0.25, 1, 1, 64, 64), dropout_mask(100, 0.25, 1, 1, 64, 64))


@needs_kernel
@pytest.mark.parametrize("case", ["window_t5_softcap", "topk_alibi", "per_head_gqa", "neighborhood_post_bias",
                                  "window_sigmoid", "topk_sigmoid"])
def test_gradcheck_float64(case):
    """Every input of the native Function (q, k, v and the learnable relative table) in float64."""
    gen = torch.Generator().manual_seed(5)
    n, heads, kv_heads = 23, 4, (1 if case == "per_head_gqa" else 2)
    if case == "neighborhood_post_bias":
        n = 20
    q = torch.randn(1, heads, n, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, n, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, n, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = RelativePositionBias(heads, num_buckets=8, max_distance=20).double()
    pattern, score = {
        "window_t5_softcap": (SlidingWindow(4, 2), ScoreChain([bias, Softcap(2.0)])),
        "topk_alibi": (TopK(5) & Causal(), ScoreChain([ALiBi(heads).double(), bias])),
        "per_head_gqa": (PerHead((SlidingWindow(2, 2), Causal(), Full(), SlidingWindow(5, 0))), bias),
        "neighborhood_post_bias": (Neighborhood(3, grid=(4, 5)), ScoreChain([Softcap(2.0), bias])),
        "window_sigmoid": (SlidingWindow(4, 2), ScoreChain([bias, Softcap(2.0)])),
        "topk_sigmoid": (TopK(5) & Causal(), bias),
    }[case]
    normalizer = mh.normalizers.Sigmoid(bias=-1.5) if case.endswith("sigmoid") else None
    backend = BlockSparseBackend(q_block=4, kv_block=4)
    table = bias.table

    def fn(q, k, v, table):
        bias.table = table
        return backend.forward(make_request(q, k, v, pattern=pattern, score=score, normalizer=normalizer))[0]

    assert type(fn(q, k, v, table).grad_fn).__name__ == "NativeBlockSparseBackward"
    assert torch.autograd.gradcheck(fn, (q, k, v, table), eps=1e-6, atol=1e-6)


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(q_len=st.integers(1, 70), extra_keys=st.integers(0, 30), left=st.integers(0, 20), right=st.integers(0, 20),
       q_block=st.integers(1, 24), kv_block=st.integers(1, 24), kv_heads=st.sampled_from([1, 2, 4]),
       slack=st.sampled_from([-1.0, 0.25, float("inf")]), seed=st.integers(0, 2 ** 16))
def test_property_windows_and_blocks(q_len, extra_keys, left, right, q_block, kv_block, kv_heads, slack, seed):
    """Any lengths (not multiples of the blocks, fewer queries than keys), windows down to a single
    key per row, any block sizes, both key-reading modes: the same function as the reference."""
    kv_len = q_len + extra_keys
    assume(left < kv_len - 1 or right < kv_len - 1)  # a window covering every key is Full()
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, q_len, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, kv_heads, kv_len, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, kv_heads, kv_len, 8, generator=gen, dtype=torch.float64)
    pattern = SlidingWindow(left, right)
    backend = BlockSparseBackend(q_block=q_block, kv_block=kv_block, window_slack=slack)
    score = ALiBi(4).double()
    got, _ = backend.forward(make_request(q, k, v, pattern=pattern, score=score))
    want = mh.attention(q, k, v, pattern=pattern, score=score, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(3, 11), cols=st.integers(3, 11), kernel=st.integers(1, 3).map(lambda r: 2 * r + 1),
       dilation=st.integers(1, 2), causal=st.booleans(), tile=st.sampled_from([None, (1, 4), (2, 2), (3, 5)]),
       seed=st.integers(0, 2 ** 16))
def test_property_grids(rows, cols, kernel, dilation, causal, tile, seed):
    kernel = min(kernel, rows // dilation, cols // dilation)
    if kernel < 1:
        return
    pattern = Neighborhood(kernel, dilation=dilation, causal=(causal, False), grid=(rows, cols))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, rows * cols, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    backend = BlockSparseBackend(tile=tile)
    got, _ = backend.forward(make_request(q, k, v, pattern=pattern))
    want = mh.attention(q, k, v, pattern=pattern, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@needs_kernel
def test_rows_that_see_a_single_key():
    q, k, v, dout = _inputs(50, 2, torch.float64, seed=8)
    _check_against_reference(SlidingWindow(0, 0), None, q, k, v, dout, torch.float32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_outputs_past_the_cache_are_streamed_and_equal_cached_stores(dtype):
    """An output of ``stream_bytes()`` or more (half the last-level cache) is written with
    streaming stores: each of its rows equals the row of a run small enough to go through the
    cache, forward and dq (both computed row by row, so equal bit for bit)."""
    heads, d = 8, 64
    n = -(-native.kernel().stream_bytes() // (heads * d * dtype.itemsize) // 64) * 64
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = [torch.randn(1, heads, n, d, generator=gen).to(dtype) for _ in range(4)]
    assert q.nbytes >= native.kernel().stream_bytes() > q[:, :1].nbytes

    def run(*tensors):
        leaves = [t.detach().requires_grad_() for t in tensors[:3]]
        out = mh.attention(*leaves, pattern=SlidingWindow(16, 16), backend="blocksparse")
        assert type(out.grad_fn).__name__ == "NativeBlockSparseBackward"
        out.backward(tensors[3])
        return out.detach(), leaves[0].grad

    big = run(q, k, v, dout)
    for h in (0, heads - 1):
        small = run(*(t[:, h:h + 1] for t in (q, k, v, dout)))
        for got, want in zip(big, small):
            assert torch.equal(got[:, h:h + 1], want)


@needs_kernel
def test_corrupt_tile_tables_are_rejected():
    """The kernel checks its table: an index out of range is an error, never a wild read."""
    q = torch.randn(1, 2, 16, 8)
    backend = BlockSparseBackend(q_block=4, kv_block=4)
    req = make_request(q, q, q, pattern=SlidingWindow(2, 2))
    good = backend.plan(req, native=True).table
    ext = native.kernel()

    def run(**changes):
        arrays = dict(zip(["q_rows", "tile_q", "tile_k", "k_idx", "tile_m", "mask", "widths", "mask_keys",
                           "k_start", "lb", "lh"], good.arrays()))
        arrays.update(changes)
        return ext.forward(q, q, q, *arrays.values(), 0.35, None, None, None, None, 0.0, 15, 0.0, 0, None)

    run()  # the table as built runs
    for changes, message in [
        (dict(k_idx=good.k_idx + 16), "key index out of range"),
        (dict(q_rows=good.q_rows - 1), "query row out of range"),
        (dict(q_rows=good.q_rows.clamp(max=14)), "appears twice"),
        (dict(tile_m=good.tile_m.clamp(min=0) + good.mask.shape[1]), "mask runs past"),
        (dict(tile_k=good.tile_k * 1000), "offsets out of range"),
        (dict(lh=3), "layout slot"),
        (dict(widths=torch.ones(3, dtype=torch.long)), "per-slot widths needs"),
        (dict(widths=torch.diff(good.tile_k).view(1, -1) + 1), "per-slot width outside"),
        (dict(mask_keys=torch.ones(1, dtype=torch.long)), "mask widths needs"),
        (dict(mask_keys=torch.diff(good.tile_k) + 1), "mask width outside"),
        (dict(mask_keys=torch.diff(good.tile_k).float()), "mask widths must be"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            run(**changes)
    with pytest.raises(RuntimeError, match="relative bias too short"):
        ext.forward(q, q, q, *good.arrays(), 0.35, torch.zeros(2, 5), None, None, None, 0.0, 15, 0.0, 0, None)


@needs_kernel
def test_bad_position_codes_are_rejected():
    """Position codes (a 2-D bias's, Routing's original positions) come for both queries and keys,
    as contiguous int64 (tokens,) or (batch, heads, tokens) tensors, and reach no column outside the
    score vector."""
    q = torch.randn(2, 2, 16, 8)
    req = make_request(q, q, q, pattern=SlidingWindow(2, 2))
    table = BlockSparseBackend(q_block=4, kv_block=4).plan(req, native=True).table
    ext = native.kernel()
    vector = torch.zeros(2, 31)
    positions = torch.arange(16).expand(2, 2, 16).contiguous()

    def run(q_codes, kv_codes):
        return ext.forward(q, q, q, *table.arrays(), 0.35, vector, None, q_codes, kv_codes, 0.0, 15, 0.0, 0, None)

    run(positions, positions)  # per (batch, head), as Routing's
    run(positions[0, 0], positions[0, 0])  # shared
    for q_codes, kv_codes, message in [
        (positions, None, "both queries and keys"),
        (positions[:1], positions, "query position codes"),
        (positions, positions.int(), "key position codes"),
        (positions, positions.transpose(1, 2), "key position codes"),
        (positions, positions + 16, "relative bias too short"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            run(q_codes, kv_codes)


@needs_kernel
@pytest.mark.parametrize("where", [0, 70_000, -1])
@pytest.mark.parametrize("bad", [-1, 512, -(2 ** 62)])
def test_a_key_list_index_out_of_range_is_rejected_wherever_it_lies(where, bad):
    """Key lists are checked by all threads in blocks of 65536 entries: a bad index in the first
    block, a middle one or the last entry is found, before any key row is read, in forward and
    backward."""
    q = torch.randn(1, 2, 512, 8)
    indices = torch.randint(0, 512, (1, 2, 512, 128))  # 131072 entries: more than one block
    table = tiles.from_key_lists(indices, torch.ones_like(indices, dtype=torch.bool))
    ext = native.kernel()
    args = (*table.arrays(), 0.35, None, None, None, None, 0.0, 511, 0.0, 0, None)
    out, lse = ext.forward(q, q, q, *args)  # the lists as drawn run
    table.k_idx.view(-1)[where] = bad
    with pytest.raises(RuntimeError, match="key index out of range"):
        ext.forward(q, q, q, *args)
    with pytest.raises(RuntimeError, match="key index out of range"):
        ext.backward(q, q, q, out, torch.ones_like(out), lse, *args, 1, False, False)


@needs_kernel
def test_what_runs_in_the_kernel_and_what_stays_on_the_torch_tiles():
    q = torch.randn(1, 2, 32, 8)
    backend = BlockSparseBackend()
    for req in (make_request(q, q, q, pattern=Causal(), dropout=0.1),
                make_request(q, q, q, pattern=Causal(), normalizer=mh.normalizers.Sigmoid()),
                make_request(q.half(), q.half(), q.half(), pattern=Causal()),
                make_request(q, q, q, pattern=Causal(), score=ALiBi(2))):
        assert backend.describe(req) == "native kernel"
    q.requires_grad_()
    assert "autograd" in BlockSparseBackend(backward="autograd").describe(make_request(q, q, q, pattern=Causal()))
    assert "KeyArgmax" in backend.describe(make_request(q, q, q, pattern=Causal(), normalizer=KeyArgmax()))


def _assert_top_keys(scores, keep):
    """``top_keys`` keeps the values ``torch.topk`` keeps (as a multiset: among equal values at the
    cut either may go), in ascending positions, valid exactly where above -inf."""
    indices, valid = top_keys(scores, keep)
    assert indices.shape == valid.shape == scores.shape[:-1] + (keep,)
    assert (indices[..., 1:] > indices[..., :-1]).all()
    got = scores.gather(-1, indices)
    want = scores.gather(-1, scores.topk(keep, -1).indices)
    finite = lambda t: t.nan_to_num(1e30, 1e29, -1e30).sort(-1).values  # noqa: E731  (NaN ranks first)
    assert torch.equal(finite(got), finite(want))
    assert torch.equal(valid, got > float("-inf"))


@needs_kernel
@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 100, 1000, 4096])
@pytest.mark.parametrize("keep", [1, 3, 16, 64])
def test_top_keys_keeps_what_torch_topk_keeps(n, keep):
    """The native selection of ``TopK``'s keys against ``torch.topk``: random rows, rows with few
    values above -inf (masked keys), rows with NaN, and rows of many equal values; widths that are
    and are not whole vectors, keep up to the row."""
    if keep > n:
        pytest.skip("keep is at most the row")
    gen = torch.Generator().manual_seed(n * 100 + keep)
    x = torch.randn(2, 32, n, generator=gen)
    for scores in (x, x.masked_fill(torch.rand(x.shape, generator=gen) < 0.9, float("-inf")),
                   x.masked_fill(torch.rand(x.shape, generator=gen) < 0.05, float("nan")),
                   torch.randint(0, 3, x.shape, generator=gen).float(), torch.full_like(x, float("-inf"))):
        _assert_top_keys(scores, keep)


def test_top_keys_falls_back_to_torch_and_refuses_bad_input():
    x = torch.randn(3, 50, dtype=torch.float64)
    _assert_top_keys(x, 7)  # not float32: torch.topk, the same contract
    ext = native.kernel()
    if ext is None:
        return
    with pytest.raises(RuntimeError, match="keep must be"):
        ext.top_keys(torch.randn(3, 5), 6)
    with pytest.raises(RuntimeError, match="float32"):
        ext.top_keys(torch.randn(3, 5, dtype=torch.float64), 2)


def test_tile_tables_count_pairs():
    """A table's pairs are the products it computes; a row-major window plan computes less than
    twice the pairs the window needs."""
    n = 1024
    q = torch.randn(1, 1, n, 8)
    backend = BlockSparseBackend()
    table = backend.plan(make_request(q, q, q, pattern=SlidingWindow(128, 128)), native=True).table
    needed = int(SlidingWindow(128, 128).dense_mask(n, n).sum())
    spans = table.tile_k.diff() * table.tile_q.diff()
    assert table.pairs == int(spans.sum()) and needed <= table.pairs <= 2 * needed
    lists = tiles.from_key_lists(torch.tensor([[[[0, 1], [1, 0]]]]), torch.tensor([[[[True, False], [True, True]]]]))
    assert lists.pairs == 4 and lists.tile_m.tolist() == [0, 2]


def test_disabled_kernel_falls_back_and_says_so():
    """With MULTIHEAD_NATIVE=0 the PyTorch tiles serve every request, explain says why, and the
    results equal the reference."""
    code = (
        "import torch, multihead as mh\n"
        "from multihead.patterns import SlidingWindow\n"
        "q = torch.randn(1, 2, 100, 8, dtype=torch.float64, requires_grad=True)\n"
        "e = mh.explain(q, q, q, pattern=SlidingWindow(5, 5), show=False)\n"
        "assert 'MULTIHEAD_NATIVE=0' in e.reasons['blocksparse'], e\n"
        "out = mh.attention(q, q, q, pattern=SlidingWindow(5, 5), backend='blocksparse')\n"
        "assert 'Native' not in type(out.grad_fn).__name__\n"
        "ref = mh.attention(q, q, q, pattern=SlidingWindow(5, 5), backend='reference')\n"
        "torch.testing.assert_close(out, ref)\n"
        "print('ok')\n")
    env = dict(os.environ, MULTIHEAD_NATIVE="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
