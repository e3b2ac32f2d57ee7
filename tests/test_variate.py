"""Variate-wise gated attention (Gateformer) against its formula (forward and gradients), and a
forecaster that must read another variate to learn."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multihead.errors import ShapeError
from multihead.nn.variate import VariateAttention


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_variate_attention_is_gated_attention_across_variate_tokens(backend):
    torch.manual_seed(0)
    module = VariateAttention(12, 8, 2, backend=backend).double()
    series = torch.randn(3, 12, 5, dtype=torch.float64, requires_grad=True)
    got = module(series)
    s2 = series.detach().clone().requires_grad_()
    rows = s2.transpose(1, 2)
    e = module.embed(rows) * torch.sigmoid(module.embed_gate(rows))  # each variate embedded alone, gated
    attn = module.attention
    q, k, v = (p(e).view(3, 5, 2, 4).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    mixed = attn.out_proj((torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), -1) @ v).transpose(1, 2).reshape(3, 5, 8))
    want = e + mixed * torch.sigmoid(module.gate(e))  # across the 5 variates, gated
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(series.grad, s2.grad)


def test_forecaster_learns_a_value_shared_across_variates():
    """Each variate must forecast the mean of every variate's last value: only attention across the
    variates can bring the others in."""
    torch.manual_seed(0)
    module, head = VariateAttention(16, 32, 4), nn.Linear(32, 1)
    opt = torch.optim.Adam([*module.parameters(), *head.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(150):
        series = torch.randn(64, 17, 4, generator=gen)
        history = series[:, :16]
        target = history[:, -1].mean(-1)
        pred = head(module(history)[:, 0]).squeeze(-1)
        loss = ((pred - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:5]) / 5


def test_variate_errors():
    with pytest.raises(ShapeError, match="series"):
        VariateAttention(12, 8, 2)(torch.randn(2, 10, 3))
    with pytest.raises(ShapeError, match="length"):
        VariateAttention(0, 8, 2)
