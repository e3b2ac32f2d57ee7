"""Packed variable-length batches: packing, per-document patterns (each document in its own frame,
images of different sizes with their own grids), their block layouts, and the module's cu_seqlens
input against padded batches and against each sequence alone."""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead import varlen
from multihead.backends import BACKENDS as REGISTRY
from multihead.backends.blocksparse import BlockSparseBackend
from multihead.errors import PatternError, ShapeError
from multihead.nn import MultiHeadAttention
from multihead.patterns import (EMPTY, Axial, BlockLayout, BlockLocal, Causal, CrossShapedWindow, Dilated,
                                Documents, Full, GlobalTokens, Halo, Intersection, Neighborhood,
                                PerDocument, PrefixLM, ShiftedWindow, SlidingWindow, TopK)
from multihead.request import make_request
from multihead.scores import ALiBi, RoPE

from conftest import assert_within_tolerance

H, KV, D = 4, 2, 8
LENGTHS = [5, 12, 3, 9]
BACKENDS = ["reference", "sdpa", "blocksparse", "documents"]

# Patterns applied inside each document; each maps a document length to the pattern it has alone.
IN_EACH_DOCUMENT = {
    "full": Full(),
    "causal": Causal(),
    "window": SlidingWindow(3, 1),
    "dilated_causal": Dilated(2, 2) & Causal(),
    "prefix": PrefixLM(3),
    "global_or_window": GlobalTokens(1) | SlidingWindow(2, 0),
    "block_local": BlockLocal(4),
}
GRIDS_2D = [(3, 4), (5, 5), (2, 6), (4, 3)]
GRIDS_3D = [(2, 3, 4), (3, 2, 5)]
ON_EACH_GRID = {
    "neighborhood_2d": (GRIDS_2D, lambda g: Neighborhood(3, grid=g) if min(g) >= 3 else Neighborhood(2, grid=g)),
    "neighborhood_2d_causal": (GRIDS_2D, lambda g: Neighborhood(2, causal=(True, False), grid=g)),
    "neighborhood_3d": (GRIDS_3D, lambda g: Neighborhood(2, dilation=(1, 1, 2), grid=g)),
    "swin": (GRIDS_2D, lambda g: ShiftedWindow(2, 1, grid=g)),
    "axial": (GRIDS_2D, lambda g: Axial(g, axis=0)),
    "halo": (GRIDS_2D, lambda g: Halo(2, 1, grid=g)),
    "cswin_per_head": (GRIDS_2D, lambda g: CrossShapedWindow(2, g, H)),
}


def packed_qkv(total: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, total, D, generator=g, dtype=dtype)
    k = torch.randn(1, KV, total, D, generator=g, dtype=dtype)
    v = torch.randn(1, KV, total, D, generator=g, dtype=dtype)
    return q, k, v


def alone(q, k, v, bounds, patterns):
    """Each document attended on its own under its pattern, concatenated."""
    outs = [mh.attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], pattern=p, backend="reference")
            for (s, e), p in zip(bounds, patterns)]
    return torch.cat(outs, 2)


# -- packing --------------------------------------------------------------------------------------

def test_pack_unpack_round_trip_with_mask_or_lengths():
    x = torch.randn(3, 6, 2, 5)
    lengths = torch.tensor([4, 6, 1])
    mask = torch.arange(6) >= lengths[:, None]
    by_mask, by_lengths = varlen.pack(x, mask), varlen.pack(x, lengths=lengths)
    assert torch.equal(by_mask.tokens, by_lengths.tokens)
    assert by_mask.cu_seqlens.tolist() == [0, 4, 10, 11]
    assert torch.equal(by_mask.tokens, torch.cat([x[0, :4], x[1], x[2, :1]]))
    back = varlen.unpack(by_mask.tokens, by_mask, padding_value=-1.0)
    assert torch.equal(back[~mask], x[~mask]) and (back[mask] == -1).all()
    assert torch.equal(varlen.pack_like(by_mask, x * 2), by_mask.tokens * 2)


def test_pack_keeps_any_padding_positions_in_order():
    x = torch.arange(8.0).view(2, 4, 1)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    packed = varlen.pack(x, mask)
    assert packed.tokens.flatten().tolist() == [1.0, 3.0, 4.0, 5.0, 6.0]
    assert packed.lengths.tolist() == [2, 3]


def test_unpack_is_differentiable():
    x = torch.randn(2, 3, 4, requires_grad=True)
    packed = varlen.pack(x, lengths=[2, 3])
    varlen.unpack(packed.tokens * 3, packed).sum().backward()
    assert torch.equal(x.grad, (torch.arange(3) < torch.tensor([[2], [3]])).float()[..., None].expand(2, 3, 4) * 3)


@pytest.mark.parametrize("call, match", [
    (lambda x: varlen.pack(x), "exactly one"),
    (lambda x: varlen.pack(x, torch.zeros(2, 3)), "bool tensor"),
    (lambda x: varlen.pack(x, lengths=[2, 4]), "lengths"),
    (lambda x: varlen.pack(x, lengths=[2, 0]), "row 1 .* no tokens"),
    (lambda x: varlen.unpack(torch.zeros(4, 4), varlen.pack(x, lengths=[2, 3])), "4 rows"),
    (lambda x: varlen.lengths_to_cu_seqlens([3, 0]), "positive"),
    (lambda x: varlen.varlen_attention(x[0], x[0], x[0], [0, 3]), "packed"),
])
def test_packing_errors_name_the_argument(call, match):
    with pytest.raises(ShapeError, match=match):
        call(torch.randn(2, 3, 4))


# -- Documents & pattern: every pattern in each document's frame ----------------------------------

def test_documents_and_shift_invariant_patterns_stay_an_intersection():
    docs = Documents(varlen.lengths_to_cu_seqlens(LENGTHS))
    assert isinstance(docs & Causal(), Intersection)
    assert isinstance(docs & (SlidingWindow(2) & Causal()), Intersection)
    assert isinstance(docs & TopK(2), Intersection)  # dynamic: resolved within the documents
    assert isinstance(docs & PrefixLM(2), PerDocument)
    # The order does not matter, nor does chaining.
    total = sum(LENGTHS)
    for a, b in [(PrefixLM(2) & docs, docs & PrefixLM(2)),
                 ((docs & Causal()) & PrefixLM(2), docs & (PrefixLM(2) & Causal()))]:
        assert torch.equal(a.dense_mask(total, total), b.dense_mask(total, total))


@pytest.mark.parametrize("name", list(IN_EACH_DOCUMENT))
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_pattern_equals_each_document_alone(name, backend):
    pattern = IN_EACH_DOCUMENT[name]
    total = sum(LENGTHS)
    cu = varlen.lengths_to_cu_seqlens(LENGTHS)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    q, k, v = packed_qkv(total)
    for t in (q, k, v):
        t.requires_grad_()
    packed = Documents(cu) & pattern
    out = mh.attention(q, k, v, pattern=packed, backend=backend)
    truth = alone(q, k, v, bounds, [pattern] * len(LENGTHS))
    assert_within_tolerance(out, truth, truth, torch.float64)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    truths = torch.autograd.grad(truth, (q, k, v), do)
    for g, t in zip(grads, truths):
        assert_within_tolerance(g, t, t, torch.float64, "gradient")


@pytest.mark.parametrize("name", list(ON_EACH_GRID))
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_image_on_its_own_grid(name, backend):
    grids, make = ON_EACH_GRID[name]
    docs = Documents.from_grids(grids)
    pattern = docs.each(make)
    bounds = docs.bounds()[0]
    q, k, v = packed_qkv(docs.length, seed=1)
    out = mh.attention(q, k, v, pattern=pattern, backend=backend)
    truth = alone(q, k, v, bounds, [make(g) for g in grids])
    assert_within_tolerance(out, truth, truth, torch.float64)


def test_top_k_within_documents_equals_each_document_alone():
    """A dynamic pattern picks among each document's keys only."""
    cu = varlen.lengths_to_cu_seqlens(LENGTHS)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    q, k, v = packed_qkv(sum(LENGTHS))
    out = mh.attention(q, k, v, pattern=Documents(cu) & TopK(2) & Causal(), backend="reference")
    truth = alone(q, k, v, bounds, [TopK(2) & Causal()] * len(LENGTHS))
    assert_within_tolerance(out, truth, truth, torch.float64)


def test_per_document_spans_give_the_exact_mask_and_block_layout():
    docs = Documents.from_grids(GRIDS_2D)
    patterns = [docs.each(lambda g: Neighborhood(2, grid=g)) & Causal(), docs & PrefixLM(4),
                docs & (BlockLocal(3) | GlobalTokens(1))]
    n = docs.length
    for pattern in patterns:
        mask = pattern.dense_mask(n, n)
        assert torch.equal(pattern.spans(n, n).mask().expand_as(mask), mask)
        for block in (4, 16):
            assert torch.equal(pattern.block_layout(n, n, block, block).state,
                               BlockLayout.from_mask(mask, block, block).state)


def test_block_layout_skips_every_tile_across_documents():
    grids = [(8, 8), (4, 8), (8, 4), (4, 4)]  # documents of 64, 32, 32, 16 tokens
    docs = Documents.from_grids(grids)
    state = docs.each(lambda g: Neighborhood(3, grid=g)).block_layout(docs.length, docs.length, 16, 16).state[0, 0]
    doc_of_block = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 3])
    across = doc_of_block[:, None] != doc_of_block[None, :]
    assert (state[across] == EMPTY).all()
    assert (state[~across] != EMPTY).any()


@pytest.mark.parametrize("backend", ["blocksparse", "documents"])
def test_score_positions_stay_relative_within_documents(backend):
    """ALiBi depends on kv - q only, so packing does not change it."""
    cu = varlen.lengths_to_cu_seqlens(LENGTHS)
    q, k, v = packed_qkv(sum(LENGTHS))
    out = mh.attention(q, k, v, pattern=Documents(cu) & Causal(), score=ALiBi(H), backend=backend)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    truth = torch.cat([mh.attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], pattern=Causal(),
                                    score=ALiBi(H), backend="reference") for s, e in bounds], 2)
    assert_within_tolerance(out, truth, truth, torch.float64)


def test_documents_backend_sees_scores_at_packed_positions():
    """A score of absolute positions: the documents backend evaluates it where each document sits."""
    from multihead.scores import Score

    class KeyPosition(Score):
        additive = True

        def forward(self, score, b, h, q_idx, kv_idx):
            return score + 0.1 * kv_idx

    cu = torch.tensor([0, 6, 20])
    q, k, v = packed_qkv(20)
    truth = mh.attention(q, k, v, pattern=Documents(cu) & Causal(), score=KeyPosition(), backend="reference")
    out = mh.attention(q, k, v, pattern=Documents(cu) & Causal(), score=KeyPosition(), backend="documents")
    assert_within_tolerance(out, truth, truth, torch.float64)


def test_auto_runs_long_documents_one_at_a_time_without_the_kernel(monkeypatch):
    long = Documents(torch.tensor([0, 100, 300])) & Causal()
    short = Documents(torch.arange(0, 301, 10)) & Causal()
    q = torch.randn(1, 2, 300, 8)
    with_kernel = REGISTRY["blocksparse"].native_unsupported(make_request(q, q, q, pattern=long)) is None
    assert mh.explain(q, q, q, pattern=long, show=False).backend == ("blocksparse" if with_kernel else "documents")
    monkeypatch.setitem(REGISTRY, "blocksparse", BlockSparseBackend(native=False))
    assert mh.explain(q, q, q, pattern=long, show=False).backend == "documents"
    assert mh.explain(q[:, :, :300], q, q, pattern=short, show=False).backend == "blocksparse"
    per_row = Documents(doc_ids=torch.tensor([[0] * 150 + [1] * 150, [0] * 100 + [1] * 200]))
    reasons = mh.explain(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1),
                         pattern=per_row, show=False).reasons
    assert "one split" in reasons["documents"]


def test_varlen_attention_takes_flash_attention_layout():
    cu = varlen.lengths_to_cu_seqlens(LENGTHS)
    q, k, v = packed_qkv(sum(LENGTHS))
    out = varlen.varlen_attention(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, pattern=PrefixLM(2))
    truth = mh.attention(q, k, v, pattern=Documents(cu) & PrefixLM(2), backend="reference")
    assert torch.allclose(out, truth[0].transpose(0, 1))


@pytest.mark.parametrize("build, match", [
    (lambda: Documents.from_grids([(3, 4), (2, 2)]) & Neighborhood(3, grid=(3, 4)), "document 1 .* Documents.each"),
    (lambda: Documents.from_grids([(3, 4), (2, 2)]).each([Full()]), "one pattern per document"),
    (lambda: Documents(torch.tensor([0, 12, 16]), grids=[(3, 4), (2, 3)]), r"grids\[1\]"),
    (lambda: Documents(doc_ids=torch.zeros(5, dtype=torch.long), grids=[(5,)]), "cu_seqlens"),
    (lambda: Documents(doc_ids=torch.tensor([[0, 0, 1], [0, 1, 1]])).each([Full(), Full()]), "one split"),
])
def test_per_document_errors(build, match):
    with pytest.raises(PatternError, match=match):
        pattern = build()
        pattern.spans(16, 16)


def test_short_documents_accept_longer_prefixes_and_windows():
    """A prefix or window longer than a document covers that whole document."""
    docs = Documents(torch.tensor([0, 2, 10]))
    mask = (docs & PrefixLM(4)).dense_mask(10, 10)[0, 0]
    assert mask[:2, :2].all() and not mask[:2, 2:].any()


# -- the module: cu_seqlens against padding and against each sequence alone -----------------------

@pytest.mark.parametrize("pattern", [None, Causal()], ids=["full", "causal"])
def test_module_packed_equals_padded(pattern):
    torch.manual_seed(0)
    module = MultiHeadAttention(16, H, kv_heads=KV, pattern=pattern, position=RoPE(4)).double()
    lengths = torch.tensor([5, 9, 2, 7])
    x = torch.randn(4, 9, 16, dtype=torch.float64, requires_grad=True)
    padding = torch.arange(9) >= lengths[:, None]
    padded = module(x, key_padding_mask=padding)
    packed = varlen.pack(x, padding)
    out = module(packed.tokens, cu_seqlens=packed.cu_seqlens)
    truth = varlen.pack_like(packed, padded)
    assert_within_tolerance(out, truth, truth, torch.float64)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *module.parameters()], do)
    truths = torch.autograd.grad(truth, [x, *module.parameters()], do)
    for g, t in zip(grads, truths):
        assert_within_tolerance(g, t, t, torch.float64, "gradient")


@pytest.mark.parametrize("pattern", [SlidingWindow(2, 1), PrefixLM(3), GlobalTokens(1) | SlidingWindow(1)],
                         ids=["window", "prefix", "global_window"])
def test_module_packed_equals_each_sequence_alone(pattern):
    torch.manual_seed(0)
    module = MultiHeadAttention(16, H, pattern=pattern, position=RoPE(4)).double()
    lengths = [5, 9, 4]
    x = [torch.randn(1, n, 16, dtype=torch.float64) for n in lengths]
    out = module(torch.cat(x, 1), cu_seqlens=varlen.lengths_to_cu_seqlens(lengths))
    truth = torch.cat([module(xi) for xi in x], 1)
    assert out.shape == (1, sum(lengths), 16)
    assert_within_tolerance(out, truth, truth, torch.float64)


def test_module_packed_accepts_two_dimensional_input_and_rejects_padding():
    module = MultiHeadAttention(8, 2)
    tokens = torch.randn(7, 8)
    assert module(tokens, cu_seqlens=torch.tensor([0, 3, 7])).shape == (7, 8)
    with pytest.raises(ShapeError, match="key_padding_mask"):
        module(tokens[None], cu_seqlens=torch.tensor([0, 3, 7]), key_padding_mask=torch.zeros(1, 7, dtype=torch.bool))
    with pytest.raises(ShapeError, match="packed"):
        module(torch.randn(2, 7, 8), cu_seqlens=torch.tensor([0, 3, 7]))


@pytest.mark.slow
def test_flex_compiles_per_document_patterns():
    """FlexAttention (compiled, CPU forward) runs images on their own grids and per-document prefixes."""
    docs = Documents.from_grids([(4, 4), (3, 5), (2, 6)])
    q, k, v = packed_qkv(docs.length, dtype=torch.float32)
    for pattern in (docs.each(lambda g: Neighborhood(2, grid=g)) & Causal(), docs & PrefixLM(3)):
        truth = mh.attention(*(t.double() for t in (q, k, v)), pattern=pattern, backend="reference")
        out = mh.attention(q, k, v, pattern=pattern, backend="flex")
        baseline = mh.attention(q, k, v, pattern=pattern, backend="reference")
        assert_within_tolerance(out, truth, baseline, torch.float32)


def test_packed_input_refused_by_a_module_that_sets_its_own_pattern():
    """A topology whose ``attention_options`` fixes the pattern cannot be restricted to each packed
    sequence: an error, not a silently ignored ``cu_seqlens``."""

    class OwnPattern(MultiHeadAttention):
        def attention_options(self):
            return {"pattern": Causal()}

    with pytest.raises(ShapeError, match="sets its own pattern"):
        OwnPattern(16, 2)(torch.randn(10, 16), cu_seqlens=torch.tensor([0, 4, 10]))
