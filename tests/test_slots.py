"""Slot attention on a feature map (GLMix) against its steps written out, and a model that learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multihead.errors import ShapeError
from multihead.models import VisionTransformer
from multihead.vision.slots import SlotAttention2d

from conftest import gratings_losses


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_slot_attention_clusters_attends_over_slots_and_dispatches(backend):
    torch.manual_seed(0)
    block = SlotAttention2d(8, 2, slots=5, backend=backend).double()
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    got = block(x)
    x2 = x.detach().clone().requires_grad_()
    t = x2.reshape(2, 24, 8)
    c = block.centres
    a = torch.softmax((t / t.norm(dim=-1, keepdim=True)) @ (c / c.norm(dim=-1, keepdim=True)).T / 0.1, -1)
    slots = (a.transpose(1, 2) @ t) / a.sum(1).unsqueeze(-1)  # each slot: the weighted mean of its tokens
    attn = block.attention
    q, k, v = (p(slots).view(2, 5, 2, 4).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    mixed = attn.out_proj((torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), -1) @ v).transpose(1, 2).reshape(2, 5, 8))
    slots = slots + mixed
    local = F.conv2d(x2.permute(0, 3, 1, 2), block.local.weight, block.local.bias, padding=1, groups=8)
    want = (a @ slots).view(x2.shape) + local.permute(0, 2, 3, 1) - x2
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(x.grad, x2.grad)


def test_glmix_block_learns_oriented_gratings():
    torch.manual_seed(0)
    model = VisionTransformer(16, 2, 32, 2, 4, attention="glmix_block", in_channels=1, num_classes=4)
    losses = gratings_losses(model, 40)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_slot_errors():
    with pytest.raises(ShapeError, match="slots"):
        SlotAttention2d(8, 2, slots=0)
    with pytest.raises(ShapeError, match="odd"):
        SlotAttention2d(8, 2, kernel=4)
    with pytest.raises(ShapeError, match="channels-last"):
        SlotAttention2d(8, 2)(torch.randn(1, 8, 4, 4))
