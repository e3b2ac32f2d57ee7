"""Cross-attention against gradient x input saliency: the saliency against a direct Jacobian, the map
capture, and agreement that is high for a layer whose output follows its attention and low for
unrelated maps."""

from __future__ import annotations

import pytest
import torch

from multihead.attribution import agreement, cross_attention_map, input_saliency
from multihead.errors import ShapeError
from multihead.nn import MultiHeadAttention


def test_saliency_is_gradient_times_input_of_each_output_norm():
    torch.manual_seed(0)
    layer = MultiHeadAttention(8, 2, kv_dim=6).double()
    queries = torch.randn(2, 3, 8, dtype=torch.float64)
    source = torch.randn(2, 5, 6, dtype=torch.float64)
    got = input_saliency(lambda s: layer(queries, s), source)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda s: layer(queries[b:b + 1], s.unsqueeze(0))[0].norm(dim=-1),
                                                 source[b])  # (T, S, D)
        rel = (jac * source[b]).sum(-1).abs()
        torch.testing.assert_close(got[b], rel / rel.sum(-1, keepdim=True))


def test_attention_of_a_value_linear_layer_agrees_with_its_saliency():
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 2)
    with torch.no_grad():  # sharp attention: a few source tokens per query
        layer.q_proj.weight.mul_(4.0)
    queries, source = torch.randn(4, 6, 16), torch.randn(4, 12, 16)
    attn = cross_attention_map(layer, lambda m: m(queries, source))
    sal = input_saliency(lambda s: layer(queries, s), source)
    assert attn.shape == sal.shape == (4, 6, 12)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4, 6))
    same = agreement(attn, sal)
    shuffled = agreement(attn[:, :, torch.randperm(12, generator=torch.Generator().manual_seed(1))], sal)
    assert same["pearson"] > 0.5 and same["overlap"] > 0.5
    assert same["pearson"] > shuffled["pearson"] + 0.3
    perfect = agreement(attn, attn)
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["overlap"] == pytest.approx(1.0)


def test_attribution_errors():
    with pytest.raises(ShapeError, match="source"):
        input_saliency(lambda s: s, torch.randn(3, 4))
    with pytest.raises(ShapeError, match="one"):
        agreement(torch.rand(1, 2, 3), torch.rand(1, 2, 4))
