"""DCAL's global-local and pair-wise cross-attention and the attention rollout against their formulas
(forward and gradients), and a GLCA probe that learns."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multihead.errors import ShapeError
from multihead.nn.dcal import GlobalLocalCrossAttention, PairWiseCrossAttention, attention_rollout


def _mha(module, queries_from, keys_from):
    q, k, v = module.project(queries_from, keys_from)
    return module.combine(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v, queries_from)


def test_rollout_multiplies_the_half_identity_mixed_maps_from_the_first_layer():
    gen = torch.Generator().manual_seed(0)
    maps = [torch.softmax(torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64), -1) for _ in range(3)]
    eye = torch.eye(5, dtype=torch.float64)
    s = [(m.mean(1) + eye) / 2 for m in maps]
    torch.testing.assert_close(attention_rollout(maps), s[2] @ s[1] @ s[0])
    torch.testing.assert_close(attention_rollout(maps).sum(-1), torch.ones(2, 5, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_glca_lets_the_top_tokens_query_every_token(backend):
    torch.manual_seed(0)
    module = GlobalLocalCrossAttention(16, 2, backend=backend).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(2, 9, dtype=torch.float64)
    got, index = module(x, scores, 3)
    want_index = torch.stack([torch.tensor(sorted(scores[b].argsort(descending=True)[:3].tolist())) for b in range(2)])
    assert torch.equal(index, want_index)
    x2 = x.detach().clone().requires_grad_()
    local = torch.stack([x2[b, want_index[b]] for b in range(2)])
    want = _mha(module, local, x2)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_pwca_spreads_the_softmax_over_both_images(backend):
    torch.manual_seed(0)
    module = PairWiseCrossAttention(16, 2, backend=backend).double()
    x, y = (torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got = module(x, y)
    x2, y2 = (t.detach().clone().requires_grad_() for t in (x, y))
    want = _mha(module, x2, torch.cat([x2, y2], 1))
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(y.grad, y2.grad)


def test_glca_probe_learns_from_the_high_scoring_tokens():
    """The class sits in the 2 tokens that score highest; GLCA pools them into a classifier."""
    torch.manual_seed(0)
    glca, head = GlobalLocalCrossAttention(16, 2), nn.Linear(16, 4)
    prototypes = torch.randn(4, 16) * 2
    opt = torch.optim.Adam([*glca.parameters(), *head.parameters()], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(120):
        labels = torch.randint(4, (32,), generator=gen)
        x = torch.randn(32, 12, 16, generator=gen)
        scores = torch.rand(32, 12, generator=gen)
        top = scores.topk(2, dim=1).indices
        x[torch.arange(32)[:, None], top] += prototypes[labels][:, None]
        out, _ = glca(x, scores, 2)
        loss = nn.functional.cross_entropy(head(out.mean(1)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:5]) / 5


def test_dcal_errors():
    with pytest.raises(ShapeError, match="keep"):
        GlobalLocalCrossAttention(16, 2)(torch.randn(1, 5, 16), torch.rand(1, 5), 6)
    with pytest.raises(ShapeError, match="scores"):
        GlobalLocalCrossAttention(16, 2)(torch.randn(1, 5, 16), torch.rand(1, 4), 2)
    with pytest.raises(ShapeError, match="one shape"):
        attention_rollout([torch.rand(1, 2, 3, 3), torch.rand(1, 2, 4, 4)])
