"""Patterns: the dense mask is the predicate; spans and block layouts are exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multihead.patterns import (BlockLayout, Causal, Documents, Full, KeyPadding, PrefixLM,
                                SlidingWindow)
from multihead.patterns.spans import EMPTY, FULL, PARTIAL


def pairwise(pattern, q_len, kv_len, batch=1, heads=1):
    """The predicate evaluated pair by pair on scalar tensors."""
    mod = pattern.aligned_mask_mod(q_len, kv_len)
    out = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                for j in range(kv_len):
                    out[b, h, i, j] = bool(mod(torch.tensor(b), torch.tensor(h), torch.tensor(i), torch.tensor(j)))
    return out


def check_all_forms(pattern, q_len, kv_len, q_block, kv_block, batch=1):
    dense = pattern.dense_mask(q_len, kv_len)
    spans = pattern.spans(q_len, kv_len)
    assert torch.equal(spans.mask().expand_as(dense), dense)
    assert torch.equal(spans.counts().expand(dense.shape[:3]), dense.sum(-1))
    layout = pattern.block_layout(q_len, kv_len, q_block, kv_block)
    brute = BlockLayout.from_mask(dense, q_block, kv_block)
    assert torch.equal(layout.state.expand_as(brute.state), brute.state)
    return dense


def window_patterns(kv_len):
    return st.one_of(
        st.builds(SlidingWindow, st.integers(0, kv_len - 2), st.integers(0, kv_len + 3)),
        st.builds(SlidingWindow, st.integers(0, kv_len + 3), st.integers(0, kv_len - 2)),
    )


@st.composite
def sequence_cases(draw):
    kv_len = draw(st.integers(2, 40))
    q_len = draw(st.integers(1, kv_len))
    simple = st.one_of(st.just(Full()), st.just(Causal()), window_patterns(kv_len),
                       st.builds(PrefixLM, st.integers(1, kv_len)))
    pattern = draw(simple)
    if draw(st.booleans()):
        other = draw(simple)
        pattern = pattern & other if draw(st.booleans()) else pattern | other
    return pattern, q_len, kv_len, draw(st.integers(1, 9)), draw(st.integers(1, 9))


@settings(max_examples=120, deadline=None)
@given(sequence_cases())
def test_sequence_patterns_all_forms_agree(case):
    pattern, q_len, kv_len, qb, kvb = case
    check_all_forms(pattern, q_len, kv_len, qb, kvb)


@settings(max_examples=25, deadline=None)
@given(sequence_cases())
def test_dense_mask_is_the_predicate_pair_by_pair(case):
    pattern, q_len, kv_len, _, _ = case
    q_len, kv_len = min(q_len, 12), min(kv_len, 12)
    if q_len > kv_len:
        q_len = kv_len
    try:
        dense = pattern.dense_mask(q_len, kv_len)
    except ValueError:
        return  # the window covers these shorter lengths entirely
    assert torch.equal(dense, pairwise(pattern, q_len, kv_len))


@st.composite
def document_cases(draw):
    lengths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
    total = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0)
    if draw(st.booleans()):
        pattern = Documents(cu)
    else:
        other = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6).filter(lambda l: sum(l) == total)
                     | st.just(lengths[::-1]))
        ids = torch.stack([torch.repeat_interleave(torch.arange(len(x)) * 3, torch.tensor(x))
                           for x in (lengths, other)])
        pattern = Documents(doc_ids=ids)
    extra = draw(st.sampled_from([None, Causal(), SlidingWindow(2, 1), PrefixLM(1)]))
    if extra is not None:
        pattern = pattern & extra
    return pattern, total, draw(st.integers(1, 7)), draw(st.integers(1, 7))


@settings(max_examples=80, deadline=None)
@given(document_cases())
def test_documents_all_forms_agree(case):
    pattern, n, qb, kvb = case
    if n <= 3 and "SlidingWindow" in repr(pattern):
        return  # SlidingWindow(2, 1) covers a sequence this short: an error by design
    dense = check_all_forms(pattern, n, n, qb, kvb)
    if n <= 14:
        assert torch.equal(dense, pairwise(pattern, n, n, batch=dense.shape[0]))


@st.composite
def padding_cases(draw):
    batch, kv_len = draw(st.integers(1, 3)), draw(st.integers(2, 30))
    rows = [draw(st.lists(st.booleans(), min_size=kv_len, max_size=kv_len)) for _ in range(batch)]
    q_len = draw(st.integers(1, kv_len))
    return KeyPadding(torch.tensor(rows)) & Causal(), q_len, kv_len, draw(st.integers(1, 7)), draw(st.integers(1, 7))


@settings(max_examples=80, deadline=None)
@given(padding_cases())
def test_key_padding_all_forms_agree(case):
    check_all_forms(*case)


def test_documents_from_cu_seqlens_and_ids_agree():
    cu = torch.tensor([0, 3, 4, 9])
    ids = torch.tensor([7, 7, 7, 1, 2, 2, 2, 2, 2])
    assert torch.equal(Documents(cu).dense_mask(9, 9), Documents(doc_ids=ids).dense_mask(9, 9))


def test_causal_alignment_is_bottom_right():
    mask = Causal().dense_mask(2, 5)[0, 0]
    assert mask.tolist() == [[True, True, True, True, False], [True] * 5]


def test_block_layout_states_and_indices():
    layout = Causal().block_layout(8, 8, 4, 4)
    assert layout.state[0, 0].tolist() == [[PARTIAL, EMPTY], [FULL, PARTIAL]]
    count, indices, is_full = layout.kv_blocks()
    assert count[0, 0].tolist() == [1, 2]
    assert indices[0, 0].tolist() == [[0, 0], [0, 1]]
    assert is_full[0, 0].tolist() == [[False, False], [True, False]]


def test_block_layout_of_a_window_is_linear_in_length():
    n = 1 << 16
    layout = SlidingWindow(128, 128).block_layout(n, n, 64, 64)
    count, _, _ = layout.kv_blocks()
    assert int(count.max()) == 5  # a 257-key window touches at most 5 blocks of 64
    assert layout.block_density < 5 / 1024


def test_density():
    assert Full().density(10, 10) == 1.0
    assert Causal().density(4, 4) == pytest.approx(10 / 16)
