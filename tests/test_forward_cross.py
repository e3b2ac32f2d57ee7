"""FcaFormer's forward cross attention against its formula (forward and gradients), the stage
wiring, and training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multihead.errors import ShapeError
from multihead.nn.forward_cross import FcaStage, ForwardCrossAttention, TokenMerge


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_forward_cross_attention_attends_to_own_and_scaled_earlier_tokens(backend):
    torch.manual_seed(0)
    module = ForwardCrossAttention(16, 2, cross=2, backend=backend).double()
    with torch.no_grad():
        module.scales.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    c1 = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    c2 = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    got = module(x, [c1, c2])
    xs = [t.detach().clone().requires_grad_() for t in (x, c1, c2)]
    keys_from = torch.cat([xs[0], xs[1] * module.scales[0], xs[2] * module.scales[1]], 1)  # LSF per channel
    q = module.q_proj(xs[0]).view(2, 9, 2, 8).transpose(1, 2)
    k = module.k_proj(keys_from).view(2, 17, 2, 8).transpose(1, 2)
    v = module.v_proj(keys_from).view(2, 17, 2, 8).transpose(1, 2)
    out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1) @ v
    want = module.out_proj(out.transpose(1, 2).reshape(2, 9, 16))
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    for a, b in zip((x, c1, c2), xs):
        torch.testing.assert_close(a.grad, b.grad)


def test_token_merge_averages_then_adds_a_depthwise_convolution():
    merge = TokenMerge(4, 3).double()
    x = torch.arange(2 * 7 * 4, dtype=torch.float64).view(2, 7, 4)
    pooled = torch.stack([x[:, 0:3].mean(1), x[:, 3:6].mean(1), x[:, 6:7].mean(1)], 1)
    torch.testing.assert_close(merge(x), pooled)  # the convolution starts at zero
    with torch.no_grad():
        merge.conv.weight.fill_(1.0)
    padded = F.pad(pooled.transpose(1, 2), (1, 1))
    conv = (padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]).transpose(1, 2) + merge.conv.bias
    torch.testing.assert_close(merge(x), pooled + conv)


def test_stage_blocks_read_the_merged_outputs_of_earlier_blocks():
    torch.manual_seed(0)
    stage = FcaStage(16, 2, depth=3, merge=4)
    assert [b.attention.cross for b in stage.blocks] == [0, 1, 2]
    x = torch.randn(2, 12, 16)
    seen = []
    hook = stage.blocks[2].attention.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append([t.shape for t in kwargs["cross_tokens"]]), with_kwargs=True)
    stage(x)
    hook.remove()
    assert seen == [[(2, 3, 16), (2, 3, 16)]]


def test_fca_stage_trains():
    torch.manual_seed(0)
    stage = FcaStage(16, 2, depth=2, merge=2)
    opt = torch.optim.Adam(stage.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):  # every token: the mean of the sequence
        x = torch.randn(16, 12, 16, generator=gen)
        loss = ((stage(x) - x.mean(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_forward_cross_errors():
    with pytest.raises(ShapeError, match="built for 1"):
        ForwardCrossAttention(16, 2, cross=1)(torch.randn(1, 4, 16))
    with pytest.raises(ShapeError, match="pattern"):
        ForwardCrossAttention(16, 2, cross=0, pattern=object())
    with pytest.raises(ShapeError, match="merge"):
        TokenMerge(16, 0)
