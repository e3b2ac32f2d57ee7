"""Combiner-Fixed against the factorised conditional expectation written out (forward and
gradients), its causality, and training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multihead.errors import ShapeError
from multihead.models.lm import make_causal
from multihead.nn.combiner import CombinerAttention


def direct(module, x):
    """A(x_i) = sum_{j in block(i), j <= i} p(j|i) v_j + sum_{r < block(i)} p(r|i) sum_{j in r} q(j|r) v_j,
    one softmax over q_i.k_j (direct) and q_i.kbar_r (regions), q(j|r) = softmax_j(w.k_j)."""
    q, k, v = module.project(x, x)
    batch, heads, length, d = q.shape
    group = heads // k.shape[1]
    b = module.block
    rows = []
    for bi in range(batch):
        for h in range(heads):
            g = h // group
            for i in range(length):
                c = i // b
                direct_keys = list(range(c * b, i + 1))
                logits = [q[bi, h, i] @ k[bi, g, j] / math.sqrt(d) for j in direct_keys]
                vals = [v[bi, g, j] for j in direct_keys]
                for r in range(c):
                    kr = k[bi, g, r * b:(r + 1) * b]
                    logits.append(q[bi, h, i] @ kr.mean(0) / math.sqrt(d))
                    qj = torch.softmax(kr @ module.region_query[g], 0)
                    vals.append(qj @ v[bi, g, r * b:(r + 1) * b])
                p = torch.softmax(torch.stack(logits), 0)
                rows.append(p @ torch.stack(vals))
    out = torch.stack(rows).view(batch, heads, length, -1)
    return module.combine(out, x)


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_combiner_is_the_factorised_expectation_forward_and_gradients(backend):
    torch.manual_seed(0)
    module = CombinerAttention(16, 4, 2, block=3, backend=backend).double()
    with torch.no_grad():
        module.region_query.normal_()
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    got = module(x)
    x2 = x.detach().clone().requires_grad_()
    want = direct(module, x2)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(x.grad, x2.grad)
    assert module.region_query.grad is not None


def test_combiner_is_causal():
    torch.manual_seed(0)
    module = CombinerAttention(16, 2, block=4)
    x = torch.randn(1, 16, 16)
    y = module(x)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(1, 7, 16)
    torch.testing.assert_close(module(x2)[:, :9], y[:, :9])
    assert make_causal(module) is module


def test_combiner_learns_to_copy_from_far_back():
    """Predict the first token of the sequence from every later position: only the region summaries
    carry it past the first block."""
    torch.manual_seed(0)
    embed, attn, head = nn.Embedding(8, 32), CombinerAttention(32, 4, block=4), nn.Linear(32, 8)
    pos = nn.Parameter(torch.randn(16, 32) * 0.5)
    opt = torch.optim.Adam([*embed.parameters(), *attn.parameters(), *head.parameters(), pos], lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(150):
        tokens = torch.randint(8, (32, 16), generator=gen)
        x = embed(tokens) + pos
        logits = head(x + attn(x))[:, 4:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, 8), tokens[:, :1].expand(-1, 12).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_combiner_errors():
    with pytest.raises(ShapeError, match="block"):
        CombinerAttention(16, 2, block=0)
    with pytest.raises(ShapeError, match="pattern"):
        CombinerAttention(16, 2, block=2, pattern=object())
