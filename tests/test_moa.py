"""MoA: the first-order influence of masking attention entries, the per-span costs, the constrained
choice, and a search that gives a local head a short window and a far-reaching head a long one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import multihead as mh
from multihead.errors import ShapeError
from multihead.moa import MoAConfig, Span, choose, influence, profile, search, window_costs
from multihead.nn import MultiHeadAttention
from multihead.patterns import Causal, PerHead


def test_influence_is_the_derivative_of_masking_and_renormalising():
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(3, 6, dtype=torch.float64), -1)
    target = torch.randn(3, 6, dtype=torch.float64)
    loss = lambda w: ((w - target) ** 2 * torch.arange(1, 7)).sum()  # noqa: E731
    leaf = a.clone().requires_grad_()
    grad, = torch.autograd.grad(loss(leaf), leaf)
    got = influence(a, grad)
    for i, j in [(0, 0), (1, 3), (2, 5)]:
        def masked(eps):  # entry (i, j) scaled by 1 - eps, its row renormalised
            w = a.clone()
            w[i, j] *= 1 - eps
            w[i] /= w[i].sum()
            return loss(w)
        eps = 1e-6
        torch.testing.assert_close(got[i, j], (masked(eps) - masked(-eps)) / (2 * eps), atol=1e-6, rtol=1e-5)


def test_window_costs_sum_the_entries_each_span_drops():
    torch.manual_seed(0)
    cost = torch.rand(2, 3, 5, 9, dtype=torch.float64)
    spans = [Span(1), Span(3), Span(0, 0.5), Span(9)]
    got = window_costs(cost, spans)
    want = torch.zeros(3, 4, dtype=torch.float64)
    for h in range(3):
        for c, s in enumerate(spans):
            keys = s.keys(9)
            for i in range(5):
                p = i + 4  # queries aligned with the last keys
                want[h, c] += sum(cost[b, h, i, j] for b in range(2) for j in range(9) if j <= p - keys)
    torch.testing.assert_close(got, want)


def _two_head_model(length=16, sharp=4.0):
    """Head 0 looks mostly one token back, head 1 six tokens back (position one-hots as input)."""
    model = MultiHeadAttention(2 * length, 2, head_dim=length, pattern=Causal(), bias=False)
    eye = torch.eye(length)
    with torch.no_grad():
        model.q_proj.weight.zero_()
        model.k_proj.weight.zero_()
        model.q_proj.weight[:length, :length] = eye * sharp
        model.q_proj.weight[length:, :length] = eye * sharp
        model.k_proj.weight[:length, :length] = torch.roll(eye, 1, 0) * sharp  # k_j = e_{j+1}
        model.k_proj.weight[length:, :length] = torch.roll(eye, 6, 0) * sharp  # k_j = e_{j+6}
    return model


def test_search_gives_the_local_head_a_short_window_and_the_far_head_a_long_one():
    torch.manual_seed(0)
    length = 16
    model = _two_head_model(length)
    x = torch.cat([torch.eye(length), torch.randn(length, length)], 1).expand(4, -1, -1).clone()
    x[..., length:] = torch.randn(4, length, length)
    targets = torch.randn(4, length, 2 * length)

    def loss_fn(m, batch):
        inputs, target = batch
        return ((m(inputs) - target) ** 2).mean()

    spans = [Span(2), Span(4), Span(8), Span(16)]
    config = search(model, loss_fn, [(x, targets)], spans, length, budget=5.0)
    (name, heads), = config.spans.items()
    assert heads == (Span(2), Span(8))
    assert config.mean_keys(length) <= 5.0
    full = model(x)
    config.apply(model, length)
    assert isinstance(model.pattern, PerHead)
    chosen = (model(x) - full).norm()
    swapped = MoAConfig({name: (Span(8), Span(2))})  # the same budget, spans the other way round
    swapped.apply(model, length)
    other = (model(x) - full).norm()
    print(f"moa: chosen spans move the output by {chosen:.3f}, swapped by {other:.3f}")
    assert chosen < 0.6 * other
    assert torch.equal(config.patterns(length)[name].dense_mask(length, length)[0, 1],
                       Span(8).pattern(length).dense_mask(length, length)[0, 0])


def test_choose_meets_the_budget_and_prefers_cheap_heads_to_shrink():
    costs = {"a": torch.tensor([[10.0, 1.0, 0.0], [0.5, 0.1, 0.0]])}
    spans = [Span(1), Span(2), Span(4)]
    config = choose(costs, spans, 10, budget=2.5)
    assert config.mean_keys(10) <= 2.5
    assert config.spans["a"] == (Span(4), Span(1))
    assert choose(costs, spans, 10, budget=4.0).spans["a"] == (Span(4), Span(4))
    with pytest.raises(ShapeError, match="budget"):
        choose(costs, spans, 10, budget=0.5)


def test_elastic_spans_grow_with_the_length():
    span = Span(4, 0.25)
    assert [span.keys(n) for n in (8, 64, 1024)] == [6, 20, 260]
    config = MoAConfig({"": (Span(2), span)})
    patterns = config.patterns(64)[""]
    counts = patterns.key_counts(64, 64)[0, :, -1]
    assert counts.tolist() == [2, 20]


def test_moa_errors():
    with pytest.raises(ShapeError, match="alpha"):
        Span(0, 0)
    with pytest.raises(ShapeError, match="one shape"):
        influence(torch.rand(2, 3), torch.rand(3, 2))
    model = _two_head_model()
    with pytest.raises(ShapeError, match="candidate"):
        profile(model, lambda m, b: m(b).sum(), [torch.randn(1, 16, 32)], [])
    with pytest.raises(ShapeError, match="no attention call"):
        profile(model, lambda m, b: m(b).sum(), [], [Span(2)])
