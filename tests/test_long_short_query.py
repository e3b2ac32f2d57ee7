"""MQSA's long- and short-query attention against its formula (forward and gradients), causality,
training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multihead.errors import ShapeError
from multihead.models.lm import make_causal
from multihead.nn.long_short_query import LongShortQueryAttention, window_mean


def test_window_mean_is_the_mean_of_the_last_tokens():
    x = torch.arange(6, dtype=torch.float64).view(1, 6, 1)
    assert window_mean(x, 3).flatten().tolist() == [0.0, 0.5, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_long_and_short_queries_mix_two_causal_attentions(backend):
    torch.manual_seed(0)
    module = LongShortQueryAttention(16, 4, 2, window=3, alpha=0.3, backend=backend).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    got = module(x)
    x2 = x.detach().clone().requires_grad_()
    k = module.k_proj(x2).view(2, 9, 2, 4).transpose(1, 2).repeat_interleave(2, 1)
    v = module.v_proj(x2).view(2, 9, 2, 4).transpose(1, 2).repeat_interleave(2, 1)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()

    def attend(queries_from):
        q = module.q_proj(queries_from).view(2, 9, 4, 4).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1) / math.sqrt(4)).masked_fill(~causal, float("-inf"))
        return logits.softmax(-1) @ v

    longq = torch.stack([x2[:, max(0, i - 2):i + 1].mean(1) for i in range(9)], 1)
    out = 0.3 * attend(longq) + 0.7 * attend(x2)
    want = module.out_proj(out.transpose(1, 2).reshape(2, 9, 16))
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(x.grad, x2.grad)


def test_long_short_query_is_causal_and_trains():
    torch.manual_seed(0)
    module = LongShortQueryAttention(32, 4, window=4)
    x = torch.randn(1, 12, 32)
    y = module(x)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(1, 5, 32)
    torch.testing.assert_close(module(x2)[:, :7], y[:, :7])
    assert make_causal(module) is module
    embed, head = nn.Embedding(8, 32), nn.Linear(32, 8)
    opt = torch.optim.Adam([*module.parameters(), *embed.parameters(), *head.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(120):  # predict the item two steps back (the window's mean and recency carry it)
        tokens = torch.randint(8, (32, 12), generator=gen)
        xx = embed(tokens)
        logits = head(xx + module(xx))[:, 2:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, 8), tokens[:, :-2].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    print(f"long/short query: loss {start:.3f} -> {end:.3f}")
    assert end < 0.7 * start


def test_long_short_query_errors():
    with pytest.raises(ShapeError, match="window"):
        LongShortQueryAttention(16, 2, window=0)
    with pytest.raises(ShapeError, match="alpha"):
        LongShortQueryAttention(16, 2, alpha=2.0)
