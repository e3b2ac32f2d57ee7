"""Tile tables of key runs (``tiles.from_runs``): Routing's clusters as tiles that lie inside one
cluster of every head, each reading its cluster's keys as one run of the frame, with per-head
widths and, under ``Causal``, a triangular mask over the tile's own rows only. Checked against the
same tiles written out as plain key lists and masks, and against the float64 reference (the
pattern x score x GQA x dtype matrix of ``test_native.py`` includes routing); relative scores
read at the tokens' original positions."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import multihead as mh
from multihead.backends import BACKENDS, native
from multihead.backends.native import tiles
from multihead.backends.native.function import native_attention
from multihead.patterns import Causal, Full, Routing
from multihead.request import make_request
from multihead.scores import ALiBi, RelativePositionBias, RelativePositionBias2d, ScoreChain, Softcap

from conftest import FLOOR, assert_within_tolerance, max_error, stable_seed

needs_kernel = pytest.mark.skipif(os.environ.get("MULTIHEAD_NATIVE", "1") == "0",
                                  reason="MULTIHEAD_NATIVE=0: the kernel is disabled")


def _lengths(seed: int, batch: int = 2, heads: int = 3, runs: int = 6, n: int = 150) -> torch.Tensor:
    """Random run lengths per (batch, head), some of them empty, each slot's summing to n."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(runs, generator=gen) ** 3  # uneven: long runs beside short ones
    weights[torch.randint(runs, (2,), generator=gen)] = 0  # empty runs
    picks = torch.multinomial(weights, batch * heads * n, replacement=True, generator=gen).view(-1, n)
    return torch.stack([torch.bincount(p, minlength=runs) for p in picks]).view(batch, heads, runs)


def _listed(table: tiles.TileTable) -> tiles.TileTable:
    """The same tiles written out plainly: every key listed, the widths and the causal triangle as
    a full (keys x rows) mask, built entry by entry."""
    slots, T = table.lb * table.lh, table.tile_q.numel() - 1
    listed = torch.diff(table.tile_k)
    keys = torch.zeros(slots, int(listed.sum()), dtype=torch.long)
    masks, tile_m, offset = [], [], 0
    for t in range(T):
        rows, width = int(table.tile_q[t + 1] - table.tile_q[t]), int(listed[t])
        allowed = torch.zeros(slots, width, rows, dtype=torch.uint8)
        for s in range(slots):
            w = int(table.widths[s, t])
            start = int(table.k_start[s, t])
            k0 = int(table.tile_k[t])
            keys[s, k0:k0 + width] = start  # padding: an allowed position, masked out
            keys[s, k0:k0 + w] = torch.arange(start, start + w)
            allowed[s, :w] = 1
            if table.mask_keys is not None:  # the last mask_keys keys under the tile's triangle
                mk = int(table.mask_keys[t])
                tri = table.mask[s, int(table.tile_m[t]):int(table.tile_m[t]) + mk * rows].view(mk, rows)
                allowed[s, w - mk:w] = tri
        masks.append(allowed.reshape(slots, -1))
        tile_m.append(offset)
        offset += width * rows
    return tiles.TileTable(q_rows=table.q_rows, tile_q=table.tile_q, tile_k=table.tile_k, k_idx=keys,
                           tile_m=torch.tensor(tile_m), mask=torch.cat(masks, 1), lb=table.lb, lh=table.lh,
                           pairs=table.pairs)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seed", range(4))
def test_every_tile_lies_in_one_run_of_every_slot_and_reads_exactly_its_keys(seed, causal):
    lengths = _lengths(seed)
    table = tiles.from_runs(lengths, causal, rows=8)
    flat = lengths.flatten(0, 1)
    ends = flat.cumsum(1)
    starts = ends - flat
    needed = 0
    for t in range(table.tile_q.numel() - 1):
        r0, r1 = int(table.tile_q[t]), int(table.tile_q[t + 1])
        assert 0 < r1 - r0 <= 8
        for s in range(flat.shape[0]):
            run = int(((starts[s] <= r0) & (r0 < ends[s])).nonzero())
            assert r1 <= ends[s, run], "a tile crosses a run's end"
            k0, w = int(table.k_start[s, t]), int(table.widths[s, t])
            assert k0 == starts[s, run]
            assert k0 + w == (r1 if causal else ends[s, run])
            needed += (r1 - r0) * int(ends[s, run] - starts[s, run])
    assert torch.equal(table.tile_q[1:] - table.tile_q[:-1] > 0, torch.ones(table.tile_q.numel() - 1, dtype=torch.bool))
    if causal:
        assert table.mask_keys is not None and torch.equal(table.mask_keys, torch.diff(table.tile_q))
    else:  # exactly the needed pairs: each row against its whole run, nothing masked
        assert table.mask.numel() == 0 and bool((table.tile_m < 0).all())
        assert table.pairs == needed / flat.shape[0]


def test_runs_that_cover_different_frames_are_refused():
    with pytest.raises(ValueError, match="same frame"):
        tiles.from_runs(torch.tensor([[[3, 4], [2, 4]]]), False)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kv_heads", [3, 1], ids=["mha", "mqa"])
def test_run_tables_equal_the_same_tiles_written_out(causal, kv_heads, dtype):
    """Key runs, per-slot widths and a mask over the last keys give what listed keys under a full
    mask give (forward and gradients), on rows tiles of 32 with runs longer and shorter than one."""
    lengths = _lengths(7, runs=5, n=150)
    table = tiles.from_runs(lengths, causal)
    plain = _listed(table)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 150, 24, generator=gen).to(dtype)
    k, v = (torch.randn(2, kv_heads, 150, 24, generator=gen).to(dtype) for _ in range(2))
    dout = torch.randn(2, 3, 150, 24, generator=gen).to(dtype)
    results = []
    for tab in (table, plain):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = native_attention(tab, *leaves, 0.3, None)
        out.backward(dout)
        results.append([out.detach()] + [t.grad for t in leaves])
    for name, got, want in zip(["out", "dq", "dk", "dv"], *results):
        assert max_error(got, want) <= FLOOR[dtype], name


@needs_kernel
@pytest.mark.parametrize("within", [None, "causal"])
def test_routing_runs_on_run_tables_and_computes_only_the_needed_pairs(monkeypatch, within):
    calls = []
    from_runs = tiles.from_runs
    monkeypatch.setattr(tiles, "from_runs", lambda *a, **kw: calls.append(a) or from_runs(*a, **kw))
    pattern = Routing(4) if within is None else Routing(4) & Causal()
    q, k, v = (torch.randn(2, 2, 100, 16, requires_grad=True) for _ in range(3))
    out = mh.attention(q, k, v, pattern=pattern, backend="blocksparse")
    assert type(out.grad_fn).__name__ == "ViewBackward0"  # the rows put back in order...
    assert len(calls) == 1  # ...after one kernel call on a table of runs
    req = make_request(q, k, v, pattern=pattern)
    lengths = req.pattern.frame_runs()[0]
    table = BACKENDS["blocksparse"].native_table(req)
    needed = float((lengths.double() ** 2).sum() / 4) if within is None else float(
        (lengths.double() * (lengths.double() + 1) / 2).sum() / 4)
    if within is None:
        assert table.pairs == needed
    else:  # the triangles of the diagonal tiles are computed whole
        assert needed < table.pairs <= needed + 100 * 31 / 2
    ref = mh.attention(q, k, v, pattern=pattern, backend="reference")
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


@needs_kernel
def test_corrupt_run_tables_are_rejected():
    table = tiles.from_runs(_lengths(3, batch=1, heads=2), True)
    ext = native.kernel()
    q = torch.randn(1, 2, 150, 8)
    names = ["q_rows", "tile_q", "tile_k", "k_idx", "tile_m", "mask", "widths", "mask_keys", "k_start", "lb", "lh"]

    def run(**changes):
        arrays = dict(zip(names, table.arrays()))
        arrays.update(changes)
        return ext.forward(q, q, q, *arrays.values(), 0.35, None, None, None, None, 0.0, 149, 0.0, 0, None)

    run()
    for changes, message in [
        (dict(k_start=table.k_start + 150), "key run out of range"),
        (dict(k_start=table.k_start - 1000), "key run out of range"),
        (dict(k_start=torch.zeros(5, dtype=torch.long)), "key runs needs"),
        (dict(widths=(table.widths - table.mask_keys).clamp(min=0)), "per-slot width outside"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            run(**changes)


def _run_mask(lengths: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, H, n, n) booleans: a query sees the keys of its own run (up to itself when causal)."""
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), row) for row in lengths.flatten(0, 1)])
    allowed = ids.unsqueeze(-1) == ids.unsqueeze(-2)
    if causal:
        allowed &= torch.ones(ids.shape[-1], ids.shape[-1], dtype=torch.bool).tril()
    return allowed.view(*lengths.shape[:2], ids.shape[-1], ids.shape[-1])


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), data=st.data(), causal=st.booleans(),
       rows=st.sampled_from([1, 3, 8, 32]), seed=st.integers(0, 2 ** 16))
def test_property_run_tables_match_dense_attention(batch, heads, data, causal, rows, seed):
    """Any runs (empty ones included, a single token, one run for the whole frame), any tile
    height: float64 forward and gradients equal dense attention under the runs' mask."""
    n = data.draw(st.integers(1, 90))
    runs = data.draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(0, n + 1, (batch * heads, runs - 1), generator=gen), -1).values
    edges = torch.cat([torch.zeros(batch * heads, 1, dtype=torch.long), cuts,
                       torch.full((batch * heads, 1), n)], -1)
    lengths = torch.diff(edges, dim=-1).view(batch, heads, runs)
    table = tiles.from_runs(lengths, causal, rows=rows)
    q, k, v, dout = (torch.randn(batch, heads, n, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    mask = _run_mask(lengths, causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = native_attention(table, *leaves, 0.4, None)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*ref, attn_mask=mask, scale=0.4)
    assert max_error(out, want) <= FLOOR[torch.float64]
    for got, expected in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(want, ref, dout)):
        assert max_error(got, expected) <= FLOOR[torch.float64]


@needs_kernel
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_float64_through_run_tables(causal):
    lengths = torch.tensor([[[5, 0, 9, 6], [1, 12, 7, 0]]])  # two heads, runs of different lengths
    table = tiles.from_runs(lengths, causal, rows=4)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 20, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: native_attention(table, q, k, v, 0.7, None), (q, k, v))


def _clustered(n: int, heads: int, kv_heads: int, clusters: int, seed: int, d: int = 16, batch: int = 2):
    """Float64 q, k, v, dout and Routing's centroids ``(heads, clusters, d)``: a token's q and k lie
    near one of ``clusters`` directions, drawn per batch element and key head (so each orders its
    tokens its own way), so that Routing assigns the same clusters to the inputs in any dtype."""
    gen = torch.Generator().manual_seed(seed)
    centroids = torch.nn.functional.normalize(torch.randn(clusters, d, generator=gen, dtype=torch.float64), dim=-1)
    which = torch.randint(clusters, (batch, kv_heads, n), generator=gen)

    def near(h):
        directions = centroids[which].repeat_interleave(h // kv_heads, 1)
        return directions + 0.15 * torch.randn(batch, h, n, d, generator=gen, dtype=torch.float64)

    q, k = near(heads), near(kv_heads)
    v = torch.randn(batch, kv_heads, n, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64)
    return q, k, v, dout, centroids.expand(heads, clusters, d).float()


def _dense_in_original_order(q, k, v, dout, score, mask, dtype):
    """Softmax attention under ``mask`` in the tokens' own order, written out in ``dtype`` (softmax in
    float32 below float64): the output and the gradients of q, k, v and the score's parameters."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    groups = q.shape[1] // k.shape[1]
    keys, values = (t.repeat_interleave(groups, 1) for t in leaves[1:])
    logits = score.apply_dense(leaves[0] @ keys.transpose(-2, -1) * q.shape[-1] ** -0.5, k.shape[2])
    logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits if dtype == torch.float64 else logits.float(), -1).to(dtype)
    out = weights @ values
    out.backward(dout.to(dtype))
    return [out.detach()] + [t.grad for t in leaves] + [p.grad for p in score.parameters()]


def _graph(out) -> set[str]:
    """The names of the autograd nodes behind ``out``."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(f for f, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def _fresh(score, dtype):
    """A copy of ``score`` in ``dtype`` without gradients."""
    fresh = copy.deepcopy(score).to(dtype)
    for p in fresh.parameters():
        p.grad = None
    return fresh


GRID = (11, 12)
RELATIVE_SCORES = {
    "alibi": lambda heads: ALiBi(heads),
    "t5_softcap": lambda heads: ScoreChain([RelativePositionBias(heads, num_buckets=8, max_distance=40),
                                            Softcap(3.0)]),
    "grid_table": lambda heads: RelativePositionBias2d(heads, max(GRID), grid=GRID),
}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("within", ["full", "causal"])
@pytest.mark.parametrize("score_name", RELATIVE_SCORES)
def test_routing_reads_relative_scores_at_the_tokens_original_positions(score_name, within, kv_heads, dtype):
    """Routing sorts the tokens by cluster; a relative score (ALiBi, T5's buckets under a softcap, a
    2-D table on a grid) still sees the tokens' own distances: the kernel reads its columns at the
    original positions (or their grid codes) of each batch element and head. Forward and the
    gradients of q, k, v and the learned tables equal attention under the cluster mask written out
    in the original order, in float64, within the tolerance rule."""
    n, heads = GRID[0] * GRID[1], 4
    q, k, v, dout, centroids = _clustered(n, heads, kv_heads, 4, seed=stable_seed(score_name, within, kv_heads))
    score = RELATIVE_SCORES[score_name](heads)
    for p in score.parameters():  # larger than the init, so that the bias matters
        p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    routing = Routing(4, iterations=0, centroids=centroids)
    pattern, inside = (routing, Full()) if within == "full" else (routing & Causal(), Causal())
    cluster = routing.resolve(q, k, 0.25, inside).pattern.cluster
    assert torch.equal(routing.resolve(q.to(dtype), k.to(dtype), 0.25, inside).pattern.cluster, cluster)
    assert len(cluster.unique()) == 4 and not (cluster == cluster[:1, :1]).all()  # the slots differ
    mask = (cluster.unsqueeze(-1) == cluster.unsqueeze(-2)) & inside.dense_mask(n, n)

    why = BACKENDS["blocksparse"].native_unsupported(make_request(q.float(), k.float(), v.float(), pattern=pattern,
                                                                  score=score))
    assert why is None, why
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = mh.attention(*leaves, pattern=pattern, score=score, backend="blocksparse")
    assert "NativeBlockSparseBackward" in _graph(out)  # under the permutations back to the tokens' order
    out.backward(dout.to(dtype))
    got = [out.detach()] + [t.grad for t in leaves] + [p.grad for p in score.parameters()]
    want = _dense_in_original_order(q, k, v, dout, _fresh(score, torch.float64), mask, torch.float64)
    base = _dense_in_original_order(q, k, v, dout, _fresh(score, torch.float32), mask, dtype)
    for name, g, w, b in zip(["out", "dq", "dk", "dv", "dscore"], got, want, base):
        assert_within_tolerance(g, w, b, dtype, name)


@needs_kernel
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_float64_of_routing_with_a_learned_relative_table(causal):
    """q, k, v and T5's table through Routing's permutations and the kernel's per-slot positions,
    in float64 (clusters far apart, so that no perturbation moves a token between them)."""
    q, k, v, _, centroids = _clustered(24, 2, 1, 3, seed=8, d=4, batch=2)
    q, k, v = (t[..., :24, :].clone().requires_grad_() for t in (q, k, v))
    bias = RelativePositionBias(2, num_buckets=6, max_distance=16).double()
    routing = Routing(3, iterations=0, centroids=centroids)
    pattern = routing & Causal() if causal else routing

    def fn(q, k, v, table):
        bias.table = table
        return mh.attention(q, k, v, pattern=pattern, score=bias, backend="blocksparse")

    assert "NativeBlockSparseBackward" in _graph(fn(q, k, v, bias.table))
    assert torch.autograd.gradcheck(fn, (q, k, v, bias.table), eps=1e-6, atol=1e-6)
