"""Attention inside sorted groups (FlatFormer's flattened windows, Histoformer's intensity bins)
against direct transcriptions, forward and gradients, and training."""

from __future__ import annotations

import math

import pytest
import torch

from multihead.errors import ShapeError
from multihead.nn.sorted_groups import (FlattenedWindowAttention, HistogramAttention, sorted_group_attention,
                                        window_order)

BACKENDS = ["reference", "blocksparse", "sdpa", "auto"]


def direct(q, k, v, order, group, across=False):
    """Sort, then for every sorted position i: softmax attention over the sorted positions of its group
    (i // group), or across groups over the positions with its rank (i % group); unsort."""
    batch, heads, n, dim = q.shape
    out = torch.zeros(batch, heads, n, v.shape[-1], dtype=q.dtype)
    rows = {}
    for b in range(batch):
        for i in range(n):
            keys = [j for j in range(n) if (j % group == i % group if across else j // group == i // group)]
            idx = order[b, keys]
            src = order[b, i]
            logits = k[b, :, idx] @ q[b, :, src].unsqueeze(-1) / math.sqrt(dim)
            rows[b, int(src)] = (torch.softmax(logits.squeeze(-1), -1).unsqueeze(1) @ v[b, :, idx]).squeeze(1)
    return torch.stack([torch.stack([rows[b, i] for i in range(n)], 1) for b in range(batch)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("across", [False, True])
def test_sorted_group_attention_is_attention_inside_sorted_groups(backend, across):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 14, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    order = torch.stack([torch.randperm(14, generator=gen) for _ in range(2)])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    got = sorted_group_attention(*leaves, order, 4, across=across, backend=backend)
    want = direct(*mine, order, 4, across)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    for a, b in zip(leaves, mine):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("axis", [0, 1])
def test_window_order_is_flatformers_lexicographic_window_sort(axis):
    gen = torch.Generator().manual_seed(0)
    coords = torch.randint(0, 12, (2, 30, 2), generator=gen).double()
    got = window_order(coords, 4.0, axis, shift=2.0)
    for b in range(2):
        def key(i):
            x, y = coords[b, i].tolist()
            wx, wy = math.floor((x + 2) / 4), math.floor((y + 2) / 4)
            w, c = (wx, wy), (x, y)
            return (w[1 - axis], w[axis], c[axis], c[1 - axis], i)
        assert got[b].tolist() == sorted(range(30), key=key)


def test_flattened_window_groups_are_equal_sized_runs_of_the_window_order():
    torch.manual_seed(0)
    module = FlattenedWindowAttention(16, 2, group=5, window=4.0)
    coords = torch.rand(2, 20, 2) * 12
    x = torch.randn(2, 20, 16)
    y = module(x, coords)
    order = window_order(coords, 4.0, 0)
    q, k, v = module.project(x, x)
    torch.testing.assert_close(y, module.combine(sorted_group_attention(q, k, v, order, 5), x))
    # a point's output depends only on the 4 others of its group: change one point of another group
    group = (order[0] == 7).nonzero().item() // 5
    other = order[0, (group + 1) % 4 * 5]
    x2 = x.clone()
    x2[0, other] += 1
    unchanged = order[0, group * 5:(group + 1) * 5]
    torch.testing.assert_close(module(x2, coords)[0, unchanged], y[0, unchanged])


def test_histogram_heads_attend_within_and_across_intensity_bins():
    torch.manual_seed(0)
    module = HistogramAttention(8, 2, group=3, head_dim=4)
    x = torch.randn(1, 12, 8)
    order = module.order(x)
    assert torch.equal(order[0], x.mean(-1)[0].argsort(stable=True))
    q, k, v = module.project(x, x)
    within = sorted_group_attention(q[:, :1], k[:, :1], v[:, :1], order, 3)
    across = sorted_group_attention(q[:, 1:], k[:, 1:], v[:, 1:], order, 3, across=True)
    torch.testing.assert_close(module(x), module.combine(torch.cat([within, across], 1), x))


def _window_mean(module, x):  # the mean over each token's 4 x 4 window of the 8 x 8 grid
    return x.view(-1, 2, 4, 2, 4, 16).mean((2, 4), keepdim=True).expand(-1, 2, 4, 2, 4, 16).reshape(x.shape)


def _bin_mean(module, x):  # the mean over each token's intensity bin
    order = module.order(x)
    sorted_x = x.gather(1, order[..., None].expand_as(x))
    means = sorted_x.view(x.shape[0], -1, 8, 16).mean(2, keepdim=True).expand(-1, -1, 8, -1).reshape(x.shape)
    return means.gather(1, order.argsort(-1)[..., None].expand_as(x))


@pytest.mark.parametrize("make,target", [
    (lambda: FlattenedWindowAttention(16, 2, group=16, window=4.0, grid=(8, 8)), _window_mean),
    (lambda: HistogramAttention(16, 2, group=8), _bin_mean),
])
def test_sorted_group_modules_learn_their_group_means(make, target):
    torch.manual_seed(0)
    module = make()
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):
        x = torch.randn(8, 64, 16, generator=gen)
        loss = ((module(x) - target(module, x)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert end < 0.3 * start, f"loss {start:.3f} -> {end:.3f}"


def test_sorted_group_errors():
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ShapeError, match="order"):
        sorted_group_attention(q, q, q, torch.arange(5).unsqueeze(0), 2)
    with pytest.raises(ShapeError, match="group"):
        sorted_group_attention(q, q, q, torch.arange(6).unsqueeze(0), 0)
    with pytest.raises(ShapeError, match="axis"):
        window_order(torch.zeros(1, 3, 2), 2.0, axis=2)
    with pytest.raises(ShapeError, match="coords"):
        FlattenedWindowAttention(16, 2, group=4, window=2.0)(torch.randn(1, 6, 16))
    with pytest.raises(ShapeError, match="heads >= 2"):
        HistogramAttention(16, 1, group=4)
