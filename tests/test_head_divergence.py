"""Vision-aware head divergence: the per-head output shift when context keys are hidden, against a
direct computation; a head that reads the context diverges, a local one does not; reinforcement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multihead.analysis import head_mask
from multihead.errors import ShapeError
from multihead.head_divergence import context_divergence, reinforcement_mask
from multihead.nn import MultiHeadAttention
from multihead.patterns import Causal, PerHead, SlidingWindow


def _heads(module, x, mask):
    q, k, v = module.project(x, x)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # (B, H, L, d)


def test_divergence_of_one_layer_is_the_mean_distance_of_head_outputs():
    torch.manual_seed(0)
    module = MultiHeadAttention(16, 4, pattern=Causal())
    x = torch.randn(3, 10, 16)
    got = context_divergence(module, x, (2, 5))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    hidden = causal.clone()
    hidden[5:, 2:5] = False  # the queries after the context do not see it
    with torch.no_grad():
        want = (_heads(module, x, causal) - _heads(module, x, hidden))[:, :, 5:].norm(dim=-1).mean((0, 2))
    torch.testing.assert_close(got, want.double().unsqueeze(0))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        local = SlidingWindow(1, 0) & Causal()
        self.a = MultiHeadAttention(16, 2, pattern=PerHead([Causal(), local]))
        self.b = MultiHeadAttention(16, 2, pattern=Causal())

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


def test_a_head_that_reads_the_context_diverges_and_a_local_one_does_not():
    torch.manual_seed(0)
    model = TwoLayers()
    x = torch.randn(4, 16, 16)
    x[:, :4] *= 5  # a loud context
    vhd = context_divergence(model, x, (0, 4), layers=["a"])
    assert vhd.shape == (1, 2)
    assert vhd[0, 0] > 5 * vhd[0, 1]  # head 1 sees only itself and the token before: only query 4 reaches the context
    both = context_divergence(model, x, (0, 4))
    assert both.shape == (2, 2) and (both[1] > 0).all()  # the second layer inherits the context-free state


def test_reinforcement_scales_the_top_heads():
    torch.manual_seed(0)
    model = TwoLayers()
    x = torch.randn(2, 12, 16)
    vhd = context_divergence(model, x, (0, 4))
    mask = reinforcement_mask(vhd, 1, 1.5)
    layer, head = divmod(int(vhd.flatten().argmax()), 2)
    want = torch.ones(2, 2, dtype=torch.float64)
    want[layer, head] = 1.5
    assert torch.equal(mask, want)
    with head_mask(model, mask):
        boosted = model(x)
    assert not torch.allclose(boosted, model(x))


def test_head_divergence_errors():
    module = MultiHeadAttention(16, 2, pattern=Causal())
    with pytest.raises(ShapeError, match="context"):
        context_divergence(module, torch.randn(1, 6, 16), (3, 2))
    with pytest.raises(ShapeError, match="top_k"):
        reinforcement_mask(torch.rand(2, 2), 5, 2.0)
