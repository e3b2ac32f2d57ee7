"""Transformer in Transformer: the inner attention equals attention inside each patch alone, the
sentences receive their patches' words, forward and gradients; a small TNT learns."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multihead.errors import ShapeError
from multihead.vision.tnt import TNTBlock

from conftest import gratings_losses


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_tnt_block_is_inner_attention_per_patch_then_outer_attention(backend):
    torch.manual_seed(0)
    block = TNTBlock(8, 12, 4, inner_heads=2, outer_heads=3, backend=backend).double()
    words = torch.randn(2, 5, 4, 8, dtype=torch.float64, requires_grad=True)
    sentences = torch.randn(2, 6, 12, dtype=torch.float64, requires_grad=True)
    y, z = block(words, sentences)
    w2, s2 = (t.detach().clone().requires_grad_() for t in (words, sentences))

    def mha(module, x):  # plain multi-head attention with module's weights, every token with every token
        q, k, v = module.project(x, x)
        return module.combine(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v, x)

    inner = block.inner
    per_patch = []
    for p in range(5):  # each patch's 4 words alone
        x = w2[:, p]
        x = x + mha(inner.attention, inner.norm1(x))
        per_patch.append(x + inner.mlp(inner.norm2(x)))
    want_y = torch.stack(per_patch, 1)
    zz = s2 + torch.cat([torch.zeros(2, 1, 12, dtype=torch.float64),
                         block.fold(block.norm(want_y.flatten(2)))], 1)
    zz = zz + mha(block.outer.attention, block.outer.norm1(zz))
    want_z = zz + block.outer.mlp(block.outer.norm2(zz))
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(z, want_z)
    dy, dz = torch.randn_like(y), torch.randn_like(z)
    torch.autograd.backward([y, z], [dy, dz])
    torch.autograd.backward([want_y, want_z], [dy, dz])
    torch.testing.assert_close(words.grad, w2.grad)
    torch.testing.assert_close(sentences.grad, s2.grad)


class TinyTNT(nn.Module):
    """16 x 16 one-channel images: 4 x 4 patches of 4 x 4 pixels, words of 2 x 2 pixels."""

    def __init__(self):
        super().__init__()
        self.word = nn.Linear(4, 8)
        self.sentence = nn.Linear(16, 16)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        self.blocks = nn.ModuleList(TNTBlock(8, 16, 4) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, images):
        b = images.shape[0]
        patches = images.view(b, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(b, 16, 4, 4)  # (b, patch, 4, 4)
        words = self.word(patches.view(b, 16, 2, 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, 16, 4, 4))
        z = torch.cat([self.cls.expand(b, -1, -1), self.sentence(patches.flatten(2))], 1)
        for block in self.blocks:
            words, z = block(words, z)
        return self.head(z[:, 0])


def test_tiny_tnt_learns_oriented_gratings():
    torch.manual_seed(0)
    model = TinyTNT()
    losses = gratings_losses(model, 60, channels=False)
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < 0.5 * start, f"loss {start:.3f} -> {end:.3f}"


def test_tnt_errors():
    block = TNTBlock(8, 12, 4)
    with pytest.raises(ShapeError, match="words"):
        block(torch.randn(1, 5, 3, 8), torch.randn(1, 6, 12))
    with pytest.raises(ShapeError, match="class token"):
        block(torch.randn(1, 5, 4, 8), torch.randn(1, 5, 12))
