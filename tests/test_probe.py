"""Attentive probes: Efficient Probing against a direct transcription (forward and gradients), the
standard probe it simplifies mapped onto it exactly, parameter counts, padding, and training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multihead.errors import ShapeError
from multihead.nn.probe import AttentiveProbe

BACKENDS = ["reference", "blocksparse", "sdpa", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_efficient_probe_is_multi_query_pooling_forward_and_gradients(backend):
    torch.manual_seed(0)
    probe = AttentiveProbe(16, 5, queries=3, backend=backend).double()
    x = torch.randn(4, 11, 16, dtype=torch.float64, requires_grad=True)
    got = probe(x)
    # Psomas et al.: each learned query q_m pools the tokens with softmax_j(q_m . x_j / sqrt(d)),
    # no key, value or output projection; the pooled vectors are averaged, then classified.
    xd = x.detach().clone().requires_grad_()
    queries = probe.queries.detach().clone().requires_grad_()
    weight = probe.classifier.weight.detach().clone().requires_grad_()
    pooled = torch.stack([torch.softmax(xd @ queries[m] / math.sqrt(16), 1).unsqueeze(1) @ xd
                          for m in range(3)]).squeeze(2).mean(0)
    want = pooled @ weight.T + probe.classifier.bias.detach()
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    for a, b in [(x.grad, xd.grad), (probe.queries.grad, queries.grad), (probe.classifier.weight.grad, weight.grad)]:
        torch.testing.assert_close(a, b)


def test_one_efficient_query_is_exactly_a_one_head_standard_probe():
    """The removed projections are redundant: fold W_k into the query and W_o W_v into the classifier."""
    torch.manual_seed(0)
    standard = AttentiveProbe(16, 5, heads=1, efficient=False).double()
    efficient = AttentiveProbe(16, 5, queries=1).double()
    pool = standard.pool
    with torch.no_grad():
        q = pool.q_proj(standard.queries)  # (1, dim), bias included; the key bias only shifts each row
        efficient.queries.copy_(q @ pool.k_proj.weight)
        fold = standard.classifier.weight @ pool.out_proj.weight @ pool.v_proj.weight
        efficient.classifier.weight.copy_(fold)
        efficient.classifier.bias.copy_(standard.classifier(pool.out_proj(pool.v_proj.bias)))
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(efficient(x), standard(x))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(AttentiveProbe(64, 10, queries=4)) < count(AttentiveProbe(64, 10, heads=8, efficient=False)) / 10


@pytest.mark.parametrize("efficient", [True, False])
def test_padding_is_ignored(efficient):
    torch.manual_seed(0)
    probe = AttentiveProbe(16, 3, heads=2, efficient=efficient)
    x = torch.randn(2, 7, 16)
    padded = torch.cat([x, torch.randn(2, 3, 16)], 1)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 7:] = True
    torch.testing.assert_close(probe(padded, key_padding_mask=mask), probe(x))


@pytest.mark.parametrize("efficient", [True, False])
def test_probe_learns_to_read_the_flagged_token(efficient):
    """Frozen features: noise tokens and one flagged token that carries the class."""
    torch.manual_seed(0)
    classes, dim = 6, 32
    prototypes, flag = torch.randn(classes, dim), torch.randn(dim) * 2

    def batch(gen):
        labels = torch.randint(classes, (64,), generator=gen)
        x = torch.randn(64, 12, dim, generator=gen)
        where = torch.randint(12, (64,), generator=gen)
        x[torch.arange(64), where] = prototypes[labels] + flag
        return x, labels

    probe = AttentiveProbe(dim, classes, heads=4, queries=4, efficient=efficient)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(150):
        x, y = batch(gen)
        loss = nn.functional.cross_entropy(probe(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert end < 0.3 * start, f"loss {start:.3f} -> {end:.3f}"


def test_probe_errors_name_the_argument():
    with pytest.raises(ShapeError, match="queries"):
        AttentiveProbe(16, 3, queries=0)
    with pytest.raises(ShapeError, match="classes"):
        AttentiveProbe(16, 0)
    with pytest.raises(ShapeError, match="x must be"):
        AttentiveProbe(16, 3)(torch.randn(2, 5, 8))
