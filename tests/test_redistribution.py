"""Visual attention redistribution against its formula, the head selection, and the model hook."""

from __future__ import annotations

import math

import pytest
import torch

from multihead.errors import ShapeError
from multihead.nn import MultiHeadAttention
from multihead.patterns import Causal
from multihead.redistribution import (find_sinks, image_centric_heads, redistribute,
                                      redistributed_attention)


def _masks():
    image = torch.zeros(2, 8, dtype=torch.bool)
    image[:, 1:6] = True  # tokens 1..5 are the image
    sinks = torch.zeros(2, 8, dtype=torch.bool)
    sinks[0, 2] = sinks[1, 4] = True  # one visual sink per batch element
    sinks[0, 7] = True  # a text token marked as a sink is not touched (not an image token)
    return sinks, image


def test_redistribution_moves_p_of_the_sink_weight_to_the_other_image_tokens():
    torch.manual_seed(0)
    weights = torch.softmax(torch.randn(2, 3, 4, 8, dtype=torch.float64), -1)
    sinks, image = _masks()
    got = redistribute(weights, sinks, image, 0.6)
    for b in range(2):
        s = [j for j in range(8) if sinks[b, j] and image[b, j]]
        rest = [j for j in range(8) if image[b, j] and not sinks[b, j]]
        for h in range(3):
            for i in range(4):
                a = weights[b, h, i]
                moved = 0.6 * a[s].sum()
                want = a.clone()
                want[s] = 0.4 * a[s]
                want[rest] = a[rest] + moved * a[rest] / a[rest].sum()
                torch.testing.assert_close(got[b, h, i], want)
    torch.testing.assert_close(got.sum(-1), weights.sum(-1))
    torch.testing.assert_close(redistribute(weights, sinks, image, 0.0), weights)


def test_sinks_by_massive_activation_and_image_centric_heads():
    hidden = torch.randn(2, 8, 16)
    hidden[0, 2, 5] = 80.0
    hidden[1, 4, 9] = -90.0
    sinks = find_sinks(hidden, [5, 9], 20.0)
    assert sinks.nonzero().tolist() == [[0, 2], [1, 4]]
    _, image = _masks()
    weights = torch.zeros(2, 2, 3, 8, dtype=torch.float64)
    weights[:, 0, :, 3] = 1.0  # head 0 looks at an image token that is not a sink
    weights[:, 1, :, 6] = 1.0  # head 1 looks at text
    assert image_centric_heads(weights, sinks, image, 0.5).tolist() == [True, False]


def test_the_model_hook_replaces_the_chosen_heads_with_redistributed_attention():
    torch.manual_seed(0)
    module = MultiHeadAttention(16, 4, pattern=Causal())
    x = torch.randn(2, 8, 16)
    sinks, image = _masks()
    plain = module(x)
    with redistributed_attention(module, {0: [1, 3]}, sinks, image, 0.5):
        got = module(x)
    q, k, v = module.project(x, x)
    logits = (q @ k.transpose(-2, -1) / math.sqrt(4)).masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(),
                                                                 float("-inf"))
    weights = logits.softmax(-1)
    new = redistribute(weights, sinks, image, 0.5)
    heads = weights @ v
    heads[:, [1, 3]] = (new @ v)[:, [1, 3]]
    torch.testing.assert_close(got, module.combine(heads, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain)
    torch.testing.assert_close(module(x), plain)  # the hook is gone


def test_redistribution_errors():
    sinks, image = _masks()
    with pytest.raises(ShapeError, match="p must"):
        redistribute(torch.rand(2, 1, 3, 8), sinks, image, 1.5)
    with pytest.raises(ShapeError, match="sinks"):
        redistribute(torch.rand(2, 1, 3, 8), sinks[:, :5], image, 0.5)
    with pytest.raises(ShapeError, match="dims"):
        find_sinks(torch.randn(1, 4, 8), [9], 1.0)
