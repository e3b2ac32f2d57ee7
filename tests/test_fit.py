"""FIT's interleaved local / latent attention against its steps written out, its locality, training."""

from __future__ import annotations

import math

import pytest
import torch

from multihead.errors import ShapeError
from multihead.nn.fit import FITBlock


def _mha(module, queries, keys, mask=None):
    q, k, v = module.project(queries, keys)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return module.combine(logits.softmax(-1) @ v, queries)


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_fit_block_is_local_write_global_read(backend):
    torch.manual_seed(0)
    block = FITBlock(16, 2, group=4, latents=2, backend=backend).double()
    with torch.no_grad():
        block.group_position.normal_()
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    got = block(x)
    x2 = x.detach().clone().requires_grad_()
    g = torch.arange(12) // 4
    data = x2 + _mha(block.local, x2, x2, g[:, None] == g[None, :])  # within each group of 4
    new_data, latents = [], []
    for i in range(3):
        d = data[:, 4 * i:4 * i + 4]
        lat = (block.latent_init + block.group_position[i]).expand(2, 2, 16)
        latents.append(lat + _mha(block.write, lat, d))  # the group's latents read its data
    flat = torch.cat(latents, 1)
    flat = flat + _mha(block.glob, flat, flat)  # all 6 latents together
    for i in range(3):
        d = data[:, 4 * i:4 * i + 4]
        new_data.append(d + _mha(block.read, d, flat[:, 2 * i:2 * i + 2]))  # data read their latents
    want = torch.cat(new_data, 1) - x2
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(x.grad, x2.grad)


def test_groups_meet_only_through_the_latents():
    """With the global attention's output zeroed, a group's outputs ignore the other groups."""
    torch.manual_seed(0)
    block = FITBlock(16, 2, group=4, latents=2)
    with torch.no_grad():
        block.glob.out_proj.weight.zero_()
        block.glob.out_proj.bias.zero_()
    x = torch.randn(1, 12, 16)
    y = block(x)
    x2 = x.clone()
    x2[:, 8:] = torch.randn(1, 4, 16)
    torch.testing.assert_close(block(x2)[:, :8], y[:, :8])


def test_fit_learns_a_global_mean():
    torch.manual_seed(0)
    block = FITBlock(16, 2, group=4, latents=2)
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(120):  # every token: the mean of all 16 tokens (4 groups)
        x = torch.randn(16, 16, 16, generator=gen)
        loss = ((x + block(x) - x.mean(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_fit_errors():
    with pytest.raises(ShapeError, match="multiple of group"):
        FITBlock(16, 2, group=4)(torch.randn(1, 10, 16))
    with pytest.raises(ShapeError, match="latents"):
        FITBlock(16, 2, group=4, latents=0)
