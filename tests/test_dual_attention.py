"""DANet's position and channel attention (as in multi-scale self-guided attention) against
transcriptions of the authors' PAM_Module and CAM_Module (forward and gradients, every backend),
training."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_backends_match, gratings_losses, on_backend
from torch import nn

from multihead.errors import ShapeError
from multihead.vision.dual_attention import ChannelAttention, PositionAttention


def authors_pam(m: PositionAttention, x):
    """PAM_Module.forward on (B, C, H, W), its 1x1 convolutions being this module's linear maps."""
    B, C, H, W = x.shape
    flat = x.view(B, C, H * W).transpose(1, 2)  # (B, N, C)
    proj_query = m.query(flat)  # (B, N, C/8)
    proj_key = m.key(flat).transpose(1, 2)  # (B, C/8, N)
    attention = torch.softmax(torch.bmm(proj_query, proj_key), dim=-1)
    proj_value = m.value(flat).transpose(1, 2)  # (B, C, N)
    out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(B, C, H, W)
    return m.gamma * out + x


def authors_cam(m: ChannelAttention, x):
    """CAM_Module.forward on (B, C, H, W)."""
    B, C, H, W = x.shape
    proj_query = x.view(B, C, -1)
    energy = torch.bmm(proj_query, x.view(B, C, -1).permute(0, 2, 1))
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    out = torch.bmm(torch.softmax(energy_new, dim=-1), x.view(B, C, -1)).view(B, C, H, W)
    return m.gamma * out + x


@pytest.mark.parametrize("module,authors", [(PositionAttention, authors_pam), (ChannelAttention, authors_cam)])
def test_dual_attention_modules_are_the_authors_on_every_backend(module, authors):
    torch.manual_seed(0)
    m = module(16).double()
    with torch.no_grad():
        m.gamma.fill_(0.7)  # 0 at initialisation, which would hide the attention
    x = torch.randn(2, 5, 6, 16, dtype=torch.float64, requires_grad=True)
    want = authors(m, x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert_backends_match(on_backend(m, x), want, [x, *m.parameters()],
                          backends=("reference", "sdpa", "blocksparse", "auto"))


def test_dual_attention_starts_as_the_identity_and_trains():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 16)
    torch.testing.assert_close(PositionAttention(16)(x), x)
    torch.testing.assert_close(ChannelAttention(16)(x), x)

    class Tiny(nn.Module):  # patches of 2, position then channel attention, |x| mean-pooled, classified
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(1, 32, 2, stride=2)
            self.position, self.channel = PositionAttention(32), ChannelAttention(32)
            self.head = nn.Linear(32, 4)

        def forward(self, images):
            x = self.embed(images).permute(0, 2, 3, 1)
            return self.head(self.channel(self.position(x)).abs().mean((1, 2)))

    model = Tiny()
    losses = gratings_losses(model, 60)
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5
    assert model.position.gamma.abs() > 0 and model.channel.gamma.abs() > 0  # the attention took part


def test_dual_attention_errors():
    with pytest.raises(ShapeError, match="reduction"):
        PositionAttention(16, reduction=0)
    with pytest.raises(ShapeError, match="channels-last"):
        ChannelAttention(16)(torch.randn(1, 16, 4, 4))
