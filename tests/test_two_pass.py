"""Shared-weight time/frequency attention (MambAttention) and LRGT's grouping attention against
their masks written out, forward and gradients, and training."""

from __future__ import annotations

import math

import pytest
import torch

from multihead.errors import ShapeError
from multihead.nn.two_pass import LongRangeGroupingAttention, SharedAxisAttention


def _masked(module, x, mask):
    q, k, v = module.project(x, x)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return module.combine(logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v, x)


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_shared_axis_attention_is_time_then_frequency_with_one_set_of_weights(backend):
    torch.manual_seed(0)
    module = SharedAxisAttention(16, 2, (5, 4), backend=backend).double()
    t = torch.arange(20) // 4
    f = torch.arange(20) % 4
    same_time_frequency_column = f[:, None] == f[None, :]  # attention along time: same frequency bin
    same_time_row = t[:, None] == t[None, :]  # attention along frequency: same time step
    x = torch.randn(2, 20, 16, dtype=torch.float64, requires_grad=True)
    got = module(x)
    x2 = x.detach().clone().requires_grad_()
    h = x2 + _masked(module.attention, x2, same_time_frequency_column)
    want = h + _masked(module.attention, h, same_time_row) - x2
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(x.grad, x2.grad)
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.attention.parameters())


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_long_range_grouping_is_intra_view_then_groups_across_views(backend):
    torch.manual_seed(0)
    views, per_view, groups = 3, 6, 2
    module = LongRangeGroupingAttention(16, 2, views, per_view, groups, backend=backend).double()
    view = torch.arange(18) // per_view
    group = torch.arange(18) % per_view % groups  # token i of every view: group i mod groups
    x = torch.randn(2, 18, 16, dtype=torch.float64, requires_grad=True)
    got = module(x)
    x2 = x.detach().clone().requires_grad_()
    h = x2 + _masked(module.intra, x2, view[:, None] == view[None, :])
    want = h + _masked(module.inter, h, group[:, None] == group[None, :]) - x2
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("make,target", [
    (lambda: SharedAxisAttention(16, 2, (4, 4)), lambda x: x.view(-1, 4, 4, 16).mean((1, 2), keepdim=True)),
    (lambda: LongRangeGroupingAttention(16, 2, 2, 8, 2), lambda x: x.mean(1, keepdim=True)),
])
def test_two_pass_modules_learn_to_spread_information(make, target):
    """Every token must add the mean of all tokens: only the two passes together reach every token."""
    torch.manual_seed(0)
    module = make()
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):
        x = torch.randn(16, 16, 16, generator=gen)
        want = target(x).reshape(16, 1, 16).expand_as(x)
        loss = ((module(x) - want) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_two_pass_errors():
    with pytest.raises(ShapeError, match="divide"):
        LongRangeGroupingAttention(16, 2, 2, 6, 4)
    with pytest.raises(ShapeError, match="grid"):
        SharedAxisAttention(16, 2, (4,))
    with pytest.raises(ShapeError, match="tokens"):
        SharedAxisAttention(16, 2, (4, 4))(torch.randn(1, 12, 16))
