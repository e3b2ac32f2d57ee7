"""The minimal attention ablations against their formulas (forward and gradients) and training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multihead.errors import ShapeError
from multihead.models import TransformerLM
from multihead.nn.minimal import MinimalAttention
from multihead.patterns import Causal


def _direct(module, x, mask=None):
    b, n, dim = x.shape
    h, d = module.heads, module.head_dim
    xs = x.view(b, n, h, d).transpose(1, 2)
    if module.qk == "separate":
        q = module.q_proj(x).view(b, n, h, d).transpose(1, 2)
        k = module.k_proj(x).view(b, n, h, d).transpose(1, 2)
    else:
        w = module.qk_weight
        q = torch.stack([xs[:, i] @ w[i] for i in range(h)], 1)  # x W_h
        k = xs if module.qk == "collapsed" else q  # collapsed: x_i^T W_h x_j; symmetric: (x W_h).(x W_h)
    v = module.v_proj(x).view(b, n, h, d).transpose(1, 2) if module.values else xs
    logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, dim)
    return module.out_proj(out) if module.values else out


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa"])
@pytest.mark.parametrize("qk", ["separate", "collapsed", "symmetric"])
@pytest.mark.parametrize("values", [True, False])
def test_minimal_forms_are_their_formulas_forward_and_gradients(backend, qk, values):
    torch.manual_seed(0)
    module = MinimalAttention(12, 3, qk=qk, values=values, pattern=Causal(), backend=backend).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    got = module(x)
    x2 = x.detach().clone().requires_grad_()
    want = _direct(module, x2, torch.ones(7, 7, dtype=torch.bool).tril())
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(x.grad, x2.grad)


def test_symmetric_similarity_and_fewer_parameters():
    torch.manual_seed(0)
    module = MinimalAttention(12, 3, qk="symmetric", values=False)
    x = torch.randn(1, 6, 12)
    q, k, _ = module.project(x, x)
    logits = q @ k.transpose(-2, -1)
    torch.testing.assert_close(logits, logits.transpose(-2, -1))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    full = count(MinimalAttention(64, 4))
    assert count(MinimalAttention(64, 4, qk="symmetric", values=False)) < 0.1 * full


@pytest.mark.parametrize("qk", ["collapsed", "symmetric"])
def test_minimal_attention_trains_in_a_language_model(qk):
    torch.manual_seed(0)
    model = TransformerLM(8, 32, 2, 4, attention=lambda d, h, n: MinimalAttention(d, h, qk=qk, values=False),
                          max_len=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(120):  # a repeated 4-token pattern: predictable from 4 tokens back
        tokens = torch.randint(8, (32, 4), generator=gen).repeat(1, 4)
        logits = model(tokens)[:, 4:-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, 8), tokens[:, 5:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_minimal_errors():
    with pytest.raises(ShapeError, match="qk"):
        MinimalAttention(12, 3, qk="tied")
    with pytest.raises(ShapeError, match="kv_heads"):
        MinimalAttention(12, 3, kv_heads=1)
    with pytest.raises(ShapeError, match="context"):
        MinimalAttention(12, 3)(torch.randn(1, 4, 12), torch.randn(1, 4, 12))
