"""Dynamic patterns (TopK, Routing) against direct dense transcriptions of their definitions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multihead as mh
from multihead import PatternError
from multihead.backends import BACKENDS
from multihead.backends.blocksparse import BlockSparseBackend
from multihead.patterns import (BlockLayout, Causal, Documents, Full, KeyPadding, Routing, SlidingWindow,
                                TopK, dynamic)
from multihead.request import make_request
from multihead.scores import ALiBi, RelativePositionBias

B, H, HKV, N, D = 2, 4, 2, 40, 8


def inputs(seed=0, n=N, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, D, generator=gen, dtype=dtype)
    k, v = (torch.randn(B, HKV, n, D, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v


def dense_attention(q, k, v, mask, score=None):
    """Softmax attention restricted to ``mask``, written out."""
    k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if score is not None:
        logits = score.apply_dense(logits, k.shape[2])
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ v


def topk_mask(q, k, keep, within):
    """Keys among the top ``keep`` scaled q.k that ``within`` allows."""
    k = k.repeat_interleave(H // HKV, 1)
    allowed = within.dense_mask(q.shape[2], k.shape[2])
    logits = (q @ k.transpose(-2, -1)).masked_fill(~allowed, float("-inf"))
    threshold = logits.topk(min(keep, k.shape[2]), -1).values[..., -1:]
    return (logits >= threshold) & allowed


def assert_equals_dense(q, k, v, pattern, score, backend, mask):
    """``multihead.attention`` with ``pattern`` equals the dense transcription under ``mask``:
    output, gradients of q, k, v and of the score's parameters."""
    params = list(score.parameters())
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense_attention(*leaves, mask, score).sum().backward()
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    got = mh.attention(*mine, pattern=pattern, score=score, backend=backend)
    got.sum().backward()
    torch.testing.assert_close(got, dense_attention(q, k, v, mask, score))
    for a, b in zip(mine, leaves):
        torch.testing.assert_close(a.grad, b.grad)
    for p, expected in zip(params, want):
        torch.testing.assert_close(p.grad, expected)


WITHIN = {"full": Full(), "causal": Causal(), "window": SlidingWindow(6, 2),
          "documents_causal": Documents(torch.tensor([0, 13, 29, N])) & Causal()}


@pytest.mark.parametrize("within", WITHIN)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_topk_equals_dense_transcription_forward_and_gradients(backend, within):
    q, k, v = inputs()
    score = ALiBi(H)
    pattern = TopK(5) if within == "full" else TopK(5) & WITHIN[within]
    if BACKENDS[backend].unsupported(make_request(q, k, v, pattern=pattern, score=score)):
        pytest.skip("backend cannot serve")
    assert_equals_dense(q, k, v, pattern, score, backend, topk_mask(q, k, 5, WITHIN[within]))


def test_topk_chunked_selection_equals_one_chunk(monkeypatch):
    q, k, v = inputs(1)
    whole = mh.attention(q, k, v, pattern=TopK(3) & Causal())
    monkeypatch.setattr(dynamic, "SELECTION_CHUNK_ELEMENTS", B * H * N * 3)  # 3 rows at a time
    torch.testing.assert_close(mh.attention(q, k, v, pattern=TopK(3) & Causal()), whole)


@pytest.mark.parametrize("within", WITHIN)
def test_topk_chunks_read_only_the_keys_their_rows_may_see(monkeypatch, within):
    """Small chunks, each against the run of keys its rows may see, choose what the dense
    transcription chooses; under a local pattern no chunk reads every key."""
    q, k, _ = inputs(11)
    monkeypatch.setattr(dynamic, "SELECTION_CHUNK_ELEMENTS", B * H * 24)  # 24 logits per (b, h)
    pattern = WITHIN[within]
    chosen = TopK(3).resolve(q, k, 1.0, pattern).pattern.dense_mask(N, N)
    assert torch.equal(chosen, topk_mask(q, k, 3, pattern))
    spans = None if within == "full" else pattern.spans(N, N)
    chunks = list(dynamic._selection_chunks(spans, N, N, 3, 24))
    allowed = pattern.dense_mask(N, N).flatten(0, 1).any(0)  # (N, N): allowed for some (b, h)
    assert [c[0] for c in chunks] == [0] + [c[1] for c in chunks[:-1]] and chunks[-1][1] == N
    for lo, hi, k0, k1 in chunks:
        assert k1 - k0 >= 3 and 0 <= k0 < k1 <= N
        assert (hi - lo) * (k1 - k0) <= 24 or hi - lo <= 1 or k1 - k0 == N
        assert not allowed[lo:hi, :k0].any() and not allowed[lo:hi, k1:].any()
    if within == "window":
        assert max(k1 - k0 for *_, k0, k1 in chunks) < N // 2


def test_topk_chunks_with_fewer_queries_than_keys_and_per_batch_padding(monkeypatch):
    """Queries aligned with the last keys, a per-batch key padding and a window: small chunks
    choose what the dense transcription chooses."""
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(B, H, 11, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, N, D, generator=gen, dtype=torch.float64)
    monkeypatch.setattr(dynamic, "SELECTION_CHUNK_ELEMENTS", B * H * 16)
    padding = KeyPadding(torch.arange(N).expand(B, N) >= torch.tensor([[N], [N - 7]]))
    for within in (Causal(), SlidingWindow(9, 0) & padding, padding):
        chosen = TopK(4).resolve(q, k, 1.0, within).pattern.dense_mask(11, N)
        assert torch.equal(chosen, topk_mask(q, k, 4, within)), within


def test_topk_larger_than_allowed_keys_keeps_all_allowed():
    q, k, v = inputs(2)
    got = mh.attention(q, k, v, pattern=TopK(N) & SlidingWindow(3, 0))
    torch.testing.assert_close(got, mh.attention(q, k, v, pattern=SlidingWindow(3, 0)))


def routing_mask(resolution):
    cluster = resolution.pattern.cluster
    return (cluster.unsqueeze(-1) == cluster.unsqueeze(-2)) & resolution.pattern.within.dense_mask(N, N)


@pytest.mark.parametrize("within", WITHIN)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_routing_equals_dense_transcription_forward_and_gradients(backend, within):
    q, k, v = inputs(3)
    score = RelativePositionBias(H, num_buckets=8, max_distance=16)
    pattern = Routing(4) if within == "full" else Routing(4) & WITHIN[within]
    if BACKENDS[backend].unsupported(make_request(q, k, v, pattern=pattern, score=score)):
        pytest.skip("backend cannot serve")
    mask = routing_mask(Routing(4).resolve(q, k, D ** -0.5, WITHIN[within]))
    assert_equals_dense(q, k, v, pattern, score, backend, mask)


@pytest.mark.parametrize("within", ["full", "causal"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_routing_without_score_equals_dense_transcription(backend, within):
    """Without a score, within Full or Causal, the documents backend runs each cluster by SDPA."""
    q, k, v = inputs(7)
    pattern = Routing(4) if within == "full" else Routing(4) & WITHIN[within]
    if BACKENDS[backend].unsupported(make_request(q, k, v, pattern=pattern)):
        assert backend not in ("documents", "blocksparse", "reference")
        pytest.skip("backend cannot serve")
    mask = routing_mask(Routing(4).resolve(q, k, D ** -0.5, WITHIN[within]))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = dense_attention(*leaves, mask)
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    got = mh.attention(*mine, pattern=pattern, backend=backend)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, mine, grad), torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(a, b)


def test_routing_tokens_of_bf16_and_grouped_heads_are_those_of_their_float32_values_per_head():
    """Routing clusters each query head's tokens, normalize(normalize(q) + normalize(k of its key
    head)), in float32: bf16 inputs are widened (into kept buffers) and a key head is added to each
    of its query heads; the clusters equal those of float32 inputs with the key heads repeated."""
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(B, H, 64, D, generator=gen).bfloat16()
    k = torch.randn(B, HKV, 64, D, generator=gen).bfloat16()
    wide = q.float(), k.float().repeat_interleave(H // HKV, dim=1)
    for within in (Full(), Causal()):
        got = Routing(5).resolve(q, k, D ** -0.5, within).pattern.cluster
        want = Routing(5).resolve(*wide, D ** -0.5, within).pattern.cluster
        assert torch.equal(got, want)


def test_routing_clusters_are_runs_of_the_frame():
    q, k, _ = inputs(8)
    pattern = Routing(5).resolve(q, k, D ** -0.5, Causal()).pattern
    lengths, causal = pattern.frame_runs()
    assert causal and lengths.shape == (B, H, 5) and bool((lengths.sum(-1) == N).all())
    lengths = lengths.flatten().tolist()
    frame_cluster = pattern.cluster.gather(2, pattern.order).flatten()  # cluster ids, run after run
    expected = torch.cat([torch.full((n,), c % 5) for c, n in enumerate(lengths)])
    assert torch.equal(frame_cluster, expected)
    assert Routing(5).resolve(q, k, D ** -0.5, SlidingWindow(3, 0)).pattern.frame_runs() is None


def test_documents_serves_plain_routing_and_auto_picks_it_for_long_clusters_without_the_kernel(monkeypatch):
    long = inputs(9, n=512, dtype=torch.float32)
    with_kernel = BACKENDS["blocksparse"].native_unsupported(make_request(*long, pattern=Routing(4))) is None
    for pattern in (Routing(4), Routing(4) & Causal()):  # the kernel's tiles of key runs are faster
        assert mh.explain(*long, pattern=pattern, show=False).backend == ("blocksparse" if with_kernel else "documents")
    monkeypatch.setitem(BACKENDS, "blocksparse", BlockSparseBackend(native=False))
    assert mh.explain(*long, pattern=Routing(4), show=False).backend == "documents"
    assert mh.explain(*long, pattern=Routing(4) & Causal(), show=False).backend == "documents"
    assert mh.explain(*inputs(9), pattern=Routing(4), show=False).backend == "blocksparse"  # 10-token clusters
    for pattern, score in ((Routing(4) & SlidingWindow(6, 2), None), (Routing(4), ALiBi(H))):
        why = BACKENDS["documents"].unsupported(make_request(*long, pattern=pattern, score=score))
        assert "Routing's clusters (within Full or Causal, no score)" in why
        assert mh.explain(*long, pattern=pattern, score=score, show=False).backend == "blocksparse"
    # dropout reaches each cluster's kernel: seeded runs agree, and differ from no dropout
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(mh.attention(*long, pattern=Routing(4), dropout=0.5, backend="documents"))
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.allclose(runs[0], mh.attention(*long, pattern=Routing(4), backend="documents"))


def test_auto_attends_wide_key_lists_with_sdpa_and_narrow_ones_block_sparse():
    q, k, v = inputs(10, dtype=torch.float32)  # 40 keys
    rule = "key lists of 1/16+ of the keys"
    for keep, grad, expected in ((5, False, "sdpa"), (4, False, "blocksparse"),  # 40 / 5 = 8, 40 / 4 = 10
                                 (3, True, "sdpa"), (2, True, "blocksparse")):   # 40 / 3 < 16, 40 / 2 = 20
        args = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        explanation = mh.explain(*args, pattern=TopK(keep), show=False)
        assert explanation.backend == expected, (keep, grad)
        assert (explanation.rule.startswith(rule)) == (expected == "sdpa")
    # an ALiBi score rides along in SDPA's float mask; the result is the same either way
    torch.testing.assert_close(mh.attention(q, k, v, pattern=TopK(5), score=ALiBi(H)),
                               mh.attention(q, k, v, pattern=TopK(5), score=ALiBi(H), backend="blocksparse"))


def test_routing_weights_come_back_in_original_order():
    q, k, v = inputs(4)
    out, weights = mh.attention(q, k, v, pattern=Routing(3) & Causal(), return_weights=True)
    mask = routing_mask(Routing(3).resolve(q, k, D ** -0.5, Causal()))
    assert (weights[~mask] == 0).all() and torch.allclose(weights.sum(-1), torch.ones(B, H, N, dtype=weights.dtype))
    torch.testing.assert_close(out, weights @ v.repeat_interleave(H // HKV, 1))


def test_kmeans_recovers_separated_clusters():
    directions = torch.eye(3, 6, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    points = directions[labels] + 0.05 * torch.randn(30, 6, generator=gen, dtype=torch.float64)
    points = torch.nn.functional.normalize(points, dim=-1)[None, None]
    centroids = dynamic.spherical_kmeans(points, points[:, :, :3], iterations=5)
    assign = (points @ centroids.transpose(-2, -1)).argmax(-1)[0, 0]
    assert torch.equal(assign, labels)


def test_kmeans_sums_every_batch_and_head_apart_and_keeps_empty_clusters():
    """The centroids equal the definition (one-hot sums per (batch, head), an empty cluster keeping
    its centroid), and the normalisation equals ``F.normalize`` (zero rows included)."""
    gen = torch.Generator().manual_seed(3)
    points = torch.nn.functional.normalize(torch.randn(2, 3, 50, 5, generator=gen, dtype=torch.float64).abs(), dim=-1)
    init = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    init[:, :, :3] = points[:, :, :3]
    init[:, :, 3, 4] = -1.0  # every point is nearer another centroid: cluster 3 stays empty
    want = torch.nn.functional.normalize(init, dim=-1)
    for _ in range(4):
        members = torch.nn.functional.one_hot((points @ want.transpose(-2, -1)).argmax(-1), 4).to(points.dtype)
        sums, counts = members.transpose(-2, -1) @ points, members.sum(2).unsqueeze(-1)
        want = torch.where(counts > 0, torch.nn.functional.normalize(sums, dim=-1), want)
    got = dynamic.spherical_kmeans(points, init, iterations=4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.equal(got[..., 3, :], want[..., 3, :])  # the empty cluster kept its centroid
    x = torch.randn(4, 7, generator=gen)
    x[1] = 0
    assert torch.equal(dynamic._unit(x), torch.nn.functional.normalize(x, dim=-1))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 40), clusters=st.integers(1, 6), window=st.integers(0, 5), seed=st.integers(0, 99),
       qb=st.integers(1, 9), kvb=st.integers(1, 9), causal=st.booleans())
def test_routing_spans_and_layout_are_exact(n, clusters, window, seed, qb, kvb, causal):
    clusters = min(clusters, n)
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 2, n, 4, generator=gen), torch.randn(2, 1, n, 4, generator=gen)
    within = SlidingWindow(window, 0 if causal else window) if window < n - 1 else (Causal() if causal else Full())
    pattern = Routing(clusters).resolve(q, k, 0.5, within).pattern
    dense = pattern.dense_mask(n, n)
    spans = pattern.spans(n, n)
    assert torch.equal(spans.mask().expand_as(dense), dense)
    assert (spans.counts() > 0).all()  # every token sees at least itself
    layout = pattern.block_layout(n, n, qb, kvb)
    assert torch.equal(layout.state, BlockLayout.from_mask(dense, qb, kvb).state)


def test_routing_visits_about_one_cluster_per_query_block():
    q, k, _ = inputs(5, n=512, dtype=torch.float32)
    pattern = Routing(8).resolve(q, k, D ** -0.5, Full()).pattern
    assert pattern.block_layout(512, 512, 32, 32).block_density < 0.35


@pytest.mark.parametrize("make, match", [
    (lambda: TopK(0), "TopK.k must be an integer >= 1"),
    (lambda: Routing(0), "Routing.clusters must be an integer >= 1"),
    (lambda: TopK(2) | Causal(), r"depends on q and k; it can be intersected \(&\)"),
    (lambda: TopK(2).mask_mod(0, 0, 0, 0), r"depends on q and k: pass it to multihead.attention"),
    (lambda: mh.attention(*inputs(), pattern=TopK(2) & Routing(2)), "intersects 2 dynamic patterns"),
    (lambda: mh.attention(inputs()[0][:, :, :5], *inputs()[1:], pattern=Routing(2)), "q_len \\(5\\) must equal kv_len"),
    (lambda: mh.attention(*inputs(), pattern=Routing(N + 1)), "exceeds the 40 tokens"),
])
def test_dynamic_errors(make, match):
    with pytest.raises(PatternError, match=match):
        make()


def test_routing_assigns_each_token_to_the_centroid_nearest_its_query_and_key():
    q, k, _ = inputs(6)
    centroids = torch.randn(H, 3, D, dtype=torch.float64)
    resolution = Routing(3, iterations=0, centroids=centroids).resolve(q, k, 1.0, Full())
    unit = torch.nn.functional.normalize
    tokens = unit(q, dim=-1) + unit(k.repeat_interleave(H // HKV, 1), dim=-1)
    expected = (tokens @ unit(centroids, dim=-1).transpose(-2, -1)).argmax(-1)
    assert torch.equal(resolution.pattern.cluster, expected)
    order = resolution.q_order
    assert (resolution.pattern.cluster.gather(2, order).diff(dim=-1) >= 0).all()  # sorted by cluster


def key_selection(seed=0, width=5):
    """Distinct random keys per row, in random order, some slots invalid."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.rand(B, H, N, N, generator=gen).argsort(-1)[..., :width]
    valid = torch.rand(B, H, N, width, generator=gen) < 0.7
    valid[..., 0] = True
    return indices, valid


def test_key_selection_counts_its_valid_keys_and_serves_lists_in_any_order():
    indices, valid = key_selection()
    pattern = dynamic.KeySelection(indices, valid, N)
    assert torch.equal(pattern.key_counts(N, N), pattern.spans(N, N).counts())
    assert torch.equal(pattern.key_counts(N, N), pattern.dense_mask(N, N).sum(-1))
    q, k, v = inputs(3)
    for backend in ("blocksparse", "sdpa"):
        torch.testing.assert_close(mh.attention(q, k, v, pattern=pattern, backend=backend),
                                   mh.attention(q, k, v, pattern=pattern, backend="reference"))


@pytest.mark.parametrize("edit, match", [
    (lambda i, ok: (i.clone().index_fill_(-1, torch.tensor([1]), 0).index_fill_(-1, torch.tensor([0]), 0), ok),
     "lists a key twice in one row"),
    (lambda i, ok: (i.clone().index_fill_(-1, torch.tensor([2]), N), ok), r"must lie in \[0, kv_len=40\)"),
    (lambda i, ok: (i.clone().index_fill_(-1, torch.tensor([2]), -1), ok), r"must lie in \[0, kv_len=40\)"),
    (lambda i, ok: (i, ok[..., :3]), "of one shape"),
    (lambda i, ok: (i.float(), ok), "integer indices and boolean valid"),
])
def test_key_selection_errors(edit, match):
    indices, valid = key_selection()
    valid[..., :3] = True
    with pytest.raises(PatternError, match=match):
        dynamic.KeySelection(*edit(indices, valid), N)


def test_key_selection_may_repeat_a_key_in_invalid_slots():
    indices, valid = key_selection()
    valid[..., 1] = False
    indices[..., 1] = indices[..., 0]  # a repeated key, but in an invalid slot
    pattern = dynamic.KeySelection(indices, valid, N)
    assert torch.equal(pattern.key_counts(N, N), pattern.dense_mask(N, N).sum(-1))
    q, k, v = inputs(4)
    torch.testing.assert_close(mh.attention(q, k, v, pattern=pattern, backend="blocksparse"),
                               mh.attention(q, k, v, pattern=pattern, backend="reference"))


@pytest.mark.parametrize("width", [0, 1, 5, 8, 16, 24])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0])
def test_slot_reductions_read_as_words_equal_torchs(width, density):
    """``any_slot`` / ``every_slot`` (slots read 8 at a time as int64 words where rows pack into
    them) equal ``any(-1)`` / ``all()``: widths that do and do not pack, views that start off a
    word or skip rows, a true slot in every byte position of a word."""
    gen = torch.Generator().manual_seed(width)
    valid = torch.rand(2, 3, 9, width, generator=gen) < density
    for view in (valid, valid[1:], valid[:, :, 1:], valid[:, 1:], valid[..., 1:], valid.transpose(1, 2)):
        assert torch.equal(dynamic.any_slot(view), view.any(-1))
        assert dynamic.every_slot(view) == bool(view.all())
    one_hot = torch.eye(width, dtype=torch.bool).view(1, 1, width, width)  # each row: one slot set
    assert dynamic.any_slot(one_hot).all()
    assert dynamic.every_slot(one_hot) == (width <= 1)


def test_key_selection_names_its_empty_rows():
    """A row whose slots are all invalid is empty (and the request refuses it); others are not."""
    indices, valid = key_selection()
    valid[0, 1, 5] = False
    pattern = dynamic.KeySelection(indices, valid, N)
    assert torch.equal(pattern.empty_rows(N, N), pattern.key_counts(N, N) == 0)
    assert pattern.empty_rows(N, N).nonzero().tolist() == [[0, 1, 5]]
    q, k, v = inputs(5)
    with pytest.raises(PatternError, match="query 5 .batch element 0, head 1. can see no key"):
        mh.attention(q, k, v, pattern=pattern, backend="blocksparse")
