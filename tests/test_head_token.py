"""DHVT's head tokens (HI-MHSA) against a transcription of the authors' HI_Attention (forward and
gradients, every backend), the class-token merge, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_backends_match, gratings_losses, on_backend
from torch import nn

from multihead.errors import ShapeError
from multihead.models.lm import make_causal
from multihead.nn.head_token import HeadTokenAttention


def authors_forward(m: HeadTokenAttention, x):
    """The authors' HI_Attention.forward (class token first), with this module's parameters."""
    B, N, C = x.shape
    h = m.heads
    x_ = x.reshape(B, -1, h, C // h).permute(0, 2, 1, 3).mean(dim=2)
    x_ = m.head_proj(x_).reshape(B, -1, h, C // h)
    x_ = F.gelu(m.head_norm(x_)).flatten(2) + m.head_position.expand(B, -1, -1)
    x = torch.cat([x, x_], dim=1)
    q, k, v = (proj(x).reshape(B, N + h, h, C // h).transpose(1, 2) for proj in (m.q_proj, m.k_proj, m.v_proj))
    attn = ((q @ k.transpose(-2, -1)) * (C // h) ** -0.5).softmax(dim=-1)
    x = m.out_proj((attn @ v).transpose(1, 2).reshape(B, N + h, C))
    cls, patch, ht = torch.split(x, [1, N - 1, h], dim=1)
    return torch.cat([cls + ht.mean(dim=1, keepdim=True), patch], dim=1)


def test_head_tokens_are_the_authors_hi_mhsa_on_every_backend():
    torch.manual_seed(0)
    m = HeadTokenAttention(16, 4).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64, requires_grad=True)
    assert_backends_match(on_backend(m, x), authors_forward(m, x), [x, *m.parameters()],
                          backends=("reference", "sdpa", "blocksparse", "auto"))


def test_head_tokens_merge_into_the_chosen_class_token():
    torch.manual_seed(0)
    first = HeadTokenAttention(16, 4)
    last = HeadTokenAttention(16, 4, class_index=-1)
    last.load_state_dict(first.state_dict())
    x = torch.randn(1, 6, 16)
    a, b = first(x), last(x)
    torch.testing.assert_close(a[:, 1:-1], b[:, 1:-1])  # other tokens: the same attention output
    merged = a[:, 0] - b[:, 0]  # the head tokens' mean output, added to token 0 by one, token -1 by the other
    torch.testing.assert_close(b[:, -1] - a[:, -1], merged)
    assert merged.abs().max() > 1e-3
    with pytest.raises(ShapeError):
        make_causal(first)  # the head tokens average every token


def test_head_token_vit_trains():
    torch.manual_seed(0)

    class Tiny(nn.Module):  # 4 x 4 patches, a class token first, one pre-norm HI-MHSA block, read token 0
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(1, 32, 4, stride=4)
            self.cls = nn.Parameter(torch.zeros(1, 1, 32))
            self.position = nn.Parameter(torch.randn(1, 17, 32) * 0.02)
            self.norm = nn.LayerNorm(32)
            self.attention = HeadTokenAttention(32, 4)
            self.head = nn.Linear(32, 4)

        def forward(self, images):
            x = self.embed(images).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.position
            x = x + self.attention(self.norm(x))
            return self.head(x[:, 0])

    losses = gratings_losses(Tiny(), 60)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_head_token_errors():
    with pytest.raises(ShapeError, match="head_dim"):
        HeadTokenAttention(16, 4, head_dim=8)
    with pytest.raises(ShapeError, match="class_index"):
        HeadTokenAttention(16, 4, class_index=1.5)
    with pytest.raises(ShapeError, match="outside"):
        HeadTokenAttention(16, 4, class_index=7)(torch.randn(1, 5, 16))
    with pytest.raises(ShapeError, match="context"):
        HeadTokenAttention(16, 4)(torch.randn(1, 5, 16), torch.randn(1, 5, 16))
