"""Wide or deep at a fixed total of heads: equal heads and attention parameters, and both train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multihead.errors import ShapeError
from multihead.models.wide import wide_lm
from multihead.nn import MultiHeadAttention


def _attention_weights(model):
    return sum(p.numel() for m in model.modules() if isinstance(m, MultiHeadAttention)
               for name, p in m.named_parameters() if name.endswith("weight"))


def test_every_depth_has_the_same_heads_and_attention_parameters():
    models = {depth: wide_lm(11, 32, 8, depth, head_dim=8, max_len=16) for depth in (1, 2, 4, 8)}
    for depth, model in models.items():
        heads = [m.heads for m in model.modules() if isinstance(m, MultiHeadAttention)]
        assert len(heads) == depth and sum(heads) == 8
    # q, k, v and output projections: 4 x dim x (total heads x head_dim) at every depth
    assert {_attention_weights(m) for m in models.values()} == {4 * 32 * 8 * 8}


@pytest.mark.parametrize("depth", [1, 4])
def test_wide_and_deep_models_train(depth):
    torch.manual_seed(0)
    model = wide_lm(8, 32, 4, depth, head_dim=8, max_len=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):  # repeat the first half
        tokens = torch.randint(8, (32, 8), generator=gen).repeat(1, 2)
        logits = model(tokens)[:, 7:-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, 8), tokens[:, 8:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_wide_lm_errors():
    with pytest.raises(ShapeError, match="divide"):
        wide_lm(8, 32, 6, 4)
    with pytest.raises(ShapeError, match="attention"):
        wide_lm(8, 32, 4, 2, attention="mha")
