"""Sliced recursive blocks: the shared block applied per pass with sliced attention, against the
passes written out (forward and gradients); parameter sharing; training."""

from __future__ import annotations

import math

import pytest
import torch

from multihead.errors import ShapeError
from multihead.models.recursive import SlicedRecursiveBlock


def _masked_attention(module, x, mask):
    q, k, v = module.project(x, x)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return module.combine(logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v, x)


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_recursive_passes_share_the_block_and_slice_attention(backend):
    torch.manual_seed(0)
    block = SlicedRecursiveBlock(16, 2, groups=(1, 4, 2), backend=backend).double()
    with torch.no_grad():
        for layer in block.between:
            layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    got = block(x)
    z = x.detach().clone().requires_grad_()
    z0 = z
    b = block.block
    for t, g in enumerate((1, 4, 2)):
        size = math.ceil(12 / g)
        slot = torch.arange(12) // size
        mask = slot[:, None] == slot[None, :]  # within each of the g slices
        z = z + _masked_attention(b.attention, b.norm1(z), mask)
        z = z + b.mlp(b.norm2(z))
        if t < 2:
            z = block.between[t](z)
    torch.testing.assert_close(got, z)
    dout = torch.randn_like(z)
    got.backward(dout)
    z.backward(dout)
    torch.testing.assert_close(x.grad, z0.grad)


def test_recursion_adds_only_the_small_projections():
    one = SlicedRecursiveBlock(32, 4, groups=(1,))
    three = SlicedRecursiveBlock(32, 4, groups=(1, 2, 4))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(three) - count(one) == 2 * (32 * 32 + 32)


def test_recursive_block_trains():
    torch.manual_seed(0)
    block = SlicedRecursiveBlock(16, 2, groups=(1, 2))
    opt = torch.optim.Adam(block.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):  # every token: the mean of the sequence
        x = torch.randn(16, 8, 16, generator=gen)
        loss = ((block(x) - x.mean(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_recursive_errors():
    with pytest.raises(ShapeError, match="groups"):
        SlicedRecursiveBlock(16, 2, groups=())
    with pytest.raises(ShapeError, match="pattern"):
        SlicedRecursiveBlock(16, 2, pattern=object())
