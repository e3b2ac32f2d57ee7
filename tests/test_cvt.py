"""CvT's convolutional projection against its formula written out (depthwise conv + batch norm before
each projection, keys and values strided), forward and gradients, and a model that learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multihead.errors import ShapeError
from multihead.models import VisionTransformer
from multihead.vision.conv_projection import ConvProjectionAttention

from conftest import gratings_losses


def _conv_bn(x, seq, stride):
    conv, bn = seq
    y = F.conv2d(x, conv.weight, stride=stride, padding=conv.weight.shape[-1] // 2, groups=x.shape[1])
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
@pytest.mark.parametrize("grid,stride", [((6, 6), 2), ((5, 7), 2), ((4, 4), 1)])
def test_conv_projection_attention_is_cvts_formula_forward_and_gradients(backend, grid, stride):
    torch.manual_seed(0)
    block = ConvProjectionAttention(8, 2, kv_stride=stride, backend=backend).double().eval()
    with torch.no_grad():
        for seq in (block.conv_q, block.conv_k, block.conv_v):
            seq[1].running_mean.normal_()
            seq[1].running_var.uniform_(0.5, 2)
            seq[1].weight.normal_()
    x = torch.randn(2, *grid, 8, dtype=torch.float64, requires_grad=True)
    got = block(x)
    x2 = x.detach().clone().requires_grad_()
    image = x2.permute(0, 3, 1, 2)
    cq, ck, cv = (_conv_bn(image, s, st).flatten(2).transpose(1, 2)
                  for s, st in ((block.conv_q, 1), (block.conv_k, stride), (block.conv_v, stride)))
    heads = lambda t: t.view(2, t.shape[1], 2, 4).transpose(1, 2)  # noqa: E731
    q, k, v = heads(block.q_proj(cq)), heads(block.k_proj(ck)), heads(block.v_proj(cv))
    assert k.shape[2] == math.ceil(grid[0] / stride) * math.ceil(grid[1] / stride)
    out = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1) @ v
    want = block.out_proj(out.transpose(1, 2).reshape(2, -1, 8)).view(x.shape)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(x.grad, x2.grad)


def test_cvt_block_learns_oriented_gratings():
    torch.manual_seed(0)
    model = VisionTransformer(16, 2, 32, 2, 4, attention="cvt_block", in_channels=1, num_classes=4)
    losses = gratings_losses(model, 40)
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < 0.5 * start, f"loss {start:.3f} -> {end:.3f}"


def test_cvt_errors():
    with pytest.raises(ShapeError, match="odd"):
        ConvProjectionAttention(8, 2, kernel=2)
    with pytest.raises(ShapeError, match="pattern"):
        from multihead.patterns import Causal
        ConvProjectionAttention(8, 2, pattern=Causal())
    with pytest.raises(ShapeError, match="channels-last"):
        ConvProjectionAttention(8, 2)(torch.randn(1, 8, 4, 4))
