"""Landmark Attention against a direct transcription of the paper's grouped softmax (training and
retrieval forms, every serving backend, forward and gradients), its patterns, and a training run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import multihead as mh
from multihead.errors import MultiheadError, PatternError, ShapeError
from multihead.nn.landmark import (LandmarkAttention, insert_landmarks, landmark_attention, landmark_positions,
                                   landmark_request, remove_landmarks)
from multihead.patterns.blocks import BlockSelection, NoLandmarkKeys
from multihead.scores.blocks import BlockBias

BACKENDS = ["reference", "blocksparse", "sdpa", "auto"]


def direct(q, k, v, block, top_k=None):
    """Mohtashami & Jaggi (2023), written out per query: earlier block g gets
    exp(s_{i,l_g}) / Z(i) split inside the block by exp(s_ij) / Z_g(i); the current block's tokens
    exp(s_ij) / Z(i); Z(i) sums the earlier landmarks (the top_k best by landmark score when
    retrieving) and the current block's tokens j <= i; landmarks mix no value."""
    batch, heads, q_len, dim = q.shape
    kv_len, group = k.shape[2], heads // k.shape[1]
    out = torch.zeros(batch, heads, q_len, v.shape[-1], dtype=q.dtype)
    rows = []
    for b in range(batch):
        for h in range(heads):
            keys, values = k[b, h // group], v[b, h // group]
            for i in range(q_len):
                pos = i + kv_len - q_len
                c = pos // block
                s = keys @ q[b, h, i] / math.sqrt(dim)
                earlier = [g for g in range(c) if (g + 1) * block <= kv_len]
                if top_k is not None:
                    earlier = sorted(earlier, key=lambda g: -float(s[g * block + block - 1].detach()))[:top_k]
                current = [j for j in range(c * block, pos + 1) if j % block != block - 1]
                z = sum(torch.exp(s[g * block + block - 1]) for g in earlier) + sum(torch.exp(s[j]) for j in current)
                o = 0
                for g in earlier:
                    regular = range(g * block, g * block + block - 1)
                    zg = sum(torch.exp(s[j]) for j in regular)
                    for j in regular:
                        o = o + torch.exp(s[j]) / zg * torch.exp(s[g * block + block - 1]) / z * values[j]
                for j in current:
                    o = o + torch.exp(s[j]) / z * values[j]
                rows.append(o)
    return torch.stack(rows).view(batch, heads, q_len, -1)


def _inputs(q_len=21, kv_len=21, heads=4, kv_heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, q_len, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(2, kv_heads, kv_len, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(2, kv_heads, kv_len, dim, generator=gen, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [None, 1, 2])
@pytest.mark.parametrize("q_len", [21, 6])
def test_landmark_attention_is_the_papers_grouped_softmax_forward_and_gradients(backend, top_k, q_len):
    q, k, v = _inputs(q_len=q_len)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    want = direct(*leaves, 4, top_k)
    got = landmark_attention(*mine, 4, top_k=top_k, backend=backend)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    want.backward(dout)
    got.backward(dout)
    for a, b in zip(mine, leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_retrieval_with_every_block_equals_the_training_form_and_fewer_blocks_differ():
    q, k, v = _inputs(kv_len=40, q_len=40)
    full = landmark_attention(q, k, v, 5)
    torch.testing.assert_close(landmark_attention(q, k, v, 5, top_k=8), full)
    assert not torch.allclose(landmark_attention(q, k, v, 5, top_k=2), full)


def test_weights_skip_landmarks_sum_to_one_and_stay_in_the_chosen_blocks():
    q, k, v = _inputs(kv_len=33, q_len=33)
    _, weights = landmark_attention(q, k, v, 4, top_k=2, return_weights=True)
    marks = landmark_positions(33, 4)
    assert weights[..., marks].abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    blocks_read = (weights.view(2, 4, 33, -1)[..., :32].reshape(2, 4, 33, 8, 4).sum(-1) > 0).sum(-1)
    assert int(blocks_read.max()) <= 3  # two retrieved blocks and the current one
    causal = torch.ones(33, 33, dtype=torch.bool).tril()
    assert weights[..., ~causal].abs().max() == 0


def test_retrieval_runs_block_sparse_on_the_chosen_blocks():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1024, 16) for _ in range(3))
    pattern, score = landmark_request(q, k, 64, top_k=2)
    assert isinstance(score, BlockBias)
    assert pattern.density(1024, 1024) < 0.2
    explanation = mh.explain(q, k, v, pattern=pattern, score=score, show=False)
    assert "blocksparse" in str(explanation).split("\n")[0]
    out = landmark_attention(q, k, v, 64, top_k=2)
    torch.testing.assert_close(out, landmark_attention(q, k, v, 64, top_k=2, backend="reference"),
                               atol=1e-5, rtol=1e-4)


def test_insert_and_remove_landmarks():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)
    mark = torch.full((3,), -1.0)
    y = insert_landmarks(x, 4, mark)
    assert y.shape == (2, 9, 3)
    assert (y[:, landmark_positions(9, 4)] == -1).all()
    torch.testing.assert_close(remove_landmarks(y, 4), x)
    with pytest.raises(ShapeError, match="landmark"):
        insert_landmarks(x, 4, torch.zeros(2))


def test_block_selection_pattern_forms_agree():
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 5, (2, 3, 10, 2), generator=gen)
    valid = torch.rand(2, 3, 10, 2, generator=gen) > 0.3
    pattern = BlockSelection(blocks, valid, 4, 18, size=3)
    dense = pattern.dense_mask(10, 18)
    assert torch.equal(pattern.spans(10, 18).mask(), dense)
    for b, h, i in [(0, 0, 0), (1, 2, 9), (1, 1, 4)]:
        want = torch.zeros(18, dtype=torch.bool)
        for g, ok in zip(blocks[b, h, i].tolist(), valid[b, h, i].tolist()):
            if ok:
                want[g * 4: min(g * 4 + 3, 18)] = True
        assert torch.equal(dense[b, h, i], want)
    no_marks = NoLandmarkKeys(4)
    assert torch.equal(no_marks.spans(9, 9).mask()[0, 0], no_marks.dense_mask(9, 9)[0, 0])
    assert not no_marks.dense_mask(9, 9)[0, 0, :, 3].any()


def test_block_selection_errors():
    blocks, valid = torch.zeros(1, 1, 4, 1, dtype=torch.long), torch.ones(1, 1, 4, 1, dtype=torch.bool)
    with pytest.raises(PatternError, match="lie in"):
        BlockSelection(blocks + 9, valid, 4, 16)
    with pytest.raises(PatternError, match="one shape"):
        BlockSelection(blocks, valid[..., :2, :], 4, 16)
    with pytest.raises(PatternError, match="size"):
        BlockSelection(blocks, valid, 4, 16, size=5)
    with pytest.raises(PatternError, match="boolean"):
        BlockSelection(blocks, valid.long(), 4, 16)
    with pytest.raises(PatternError, match="was made for"):
        BlockSelection(blocks, valid, 4, 16).dense_mask(5, 16)
    with pytest.raises(PatternError, match="block"):
        NoLandmarkKeys(1)


def test_landmark_errors_name_the_argument():
    q, k, v = _inputs()
    with pytest.raises(ShapeError, match="block"):
        landmark_attention(q, k, v, 1)
    with pytest.raises(ShapeError, match="top_k"):
        landmark_attention(q, k, v, 4, top_k=0)
    with pytest.raises(ShapeError, match="q_len"):
        landmark_attention(q, k[:, :, :5], v[:, :, :5], 4)
    with pytest.raises(ShapeError, match="pattern"):
        LandmarkAttention(16, 2, block=4, pattern=NoLandmarkKeys(4))
    with pytest.raises(ShapeError, match="context"):
        LandmarkAttention(16, 2, block=4)(torch.randn(1, 5, 16), torch.randn(1, 5, 16))
    assert issubclass(ShapeError, MultiheadError) and issubclass(ShapeError, ValueError)


def test_module_is_causal_and_matches_the_functional_form():
    torch.manual_seed(0)
    module = LandmarkAttention(16, 4, 2, block=4)
    x = torch.randn(2, 13, 16)
    y, weights = module(x, need_weights=True)
    q, k, v = module.project(x, x)
    torch.testing.assert_close(y, module.combine(landmark_attention(q, k, v, 4), x))
    assert weights.shape == (2, 4, 13, 13)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(2, 4, 16)
    torch.testing.assert_close(module(x2)[:, :9], y[:, :9])


class LandmarkRecall(nn.Module):
    """Associative recall over landmark blocks: pairs in earlier blocks, the query in the last one."""

    def __init__(self, dim=32, keys=16, values=8, block=4, top_k=None):
        super().__init__()
        self.block = block
        self.keys, self.values = nn.Embedding(keys, dim), nn.Embedding(values + 1, dim)
        self.landmark = nn.Parameter(torch.randn(dim) * 0.02)
        self.layers = nn.ModuleList(LandmarkAttention(dim, 4, block=block, top_k=top_k) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, values)

    def forward(self, keys, values):
        x = insert_landmarks(self.keys(keys) + self.values(values), self.block, self.landmark)
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return self.head(self.norm(remove_landmarks(x, self.block)[:, -1]))


def _recall_batch(gen, batch=64, pairs=6, keys=16, values=8):
    k = torch.rand(batch, keys, generator=gen).argsort(-1)[:, :pairs]
    v = torch.randint(values, (batch, pairs), generator=gen)
    which = torch.randint(pairs, (batch,), generator=gen)
    rows = torch.arange(batch)
    tokens_k = torch.cat([k, k[rows, which].unsqueeze(1)], 1)
    tokens_v = torch.cat([v, torch.full((batch, 1), values)], 1)
    return (tokens_k, tokens_v), v[rows, which]


def test_landmark_model_learns_recall_through_its_landmarks():
    torch.manual_seed(0)
    model = LandmarkRecall()
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(250):
        inputs, target = _recall_batch(gen)
        loss = nn.functional.cross_entropy(model(*inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert start > 1.8  # chance: log(8) = 2.08; every pair sits in an earlier block than the query
    print(f"landmark recall: loss {start:.3f} -> {end:.3f}")
    assert end < 0.25 * start, f"loss {start:.3f} -> {end:.3f}"
