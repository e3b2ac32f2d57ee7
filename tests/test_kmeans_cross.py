"""kMaX's k-means cross-attention against its formula: a hard assignment of every pixel to its best
centre, centres updated with the sum of their pixels' values (forward and gradients), and training."""

from __future__ import annotations

import math

import pytest
import torch

from multihead.errors import ShapeError
from multihead.nn.kmeans_cross import ClusterArgmax, KMeansCrossAttention


def test_cluster_argmax_is_one_hot_over_the_queries():
    logits = torch.tensor([[[[0.1, 2.0, -1.0], [0.5, 0.0, 3.0]]]])  # 2 clusters x 3 pixels
    w = ClusterArgmax().weights(logits, 3)
    assert w.tolist() == [[[[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]]]
    torch.testing.assert_close(w.sum(-2), torch.ones(1, 1, 3))


def test_kmeans_cross_attention_is_the_hard_assignment_update_forward_and_gradients():
    torch.manual_seed(0)
    module = KMeansCrossAttention(16, 2).double()
    centres = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    pixels = torch.randn(2, 30, 16, dtype=torch.float64, requires_grad=True)
    got = module(centres, pixels)
    c2, p2 = (t.detach().clone().requires_grad_() for t in (centres, pixels))
    q = module.q_proj(c2).view(2, 5, 2, 8).transpose(1, 2)
    k = module.k_proj(p2).view(2, 30, 2, 8).transpose(1, 2)
    v = module.v_proj(p2).view(2, 30, 2, 8).transpose(1, 2)
    logits = q @ k.transpose(-2, -1) / math.sqrt(8)
    assign = torch.zeros_like(logits)
    assign.scatter_(2, logits.argmax(2, keepdim=True), 1.0)  # every pixel to its best centre, per head
    want = c2 + module.out_proj((assign @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(module.assignment_logits(centres, pixels), logits)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(centres.grad, c2.grad)
    torch.testing.assert_close(pixels.grad, p2.grad)


def test_centres_learn_their_clusters_sums():
    """Pixels from 4 blobs along orthogonal directions, q and k fixed to the identity so the argmax
    assigns every pixel to its blob's centre; each updated centre must become its blob's sum, which
    only the assigned pixels' values can supply (the v and output projections learn it)."""
    torch.manual_seed(0)
    module = KMeansCrossAttention(8, 1)
    with torch.no_grad():
        for proj in (module.q_proj, module.k_proj):
            proj.weight.copy_(torch.eye(8))
            proj.bias.zero_()
            proj.requires_grad_(False)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    axes = torch.eye(8)[:4] * 3
    losses = []
    for _ in range(150):
        pixels = (axes[None, :, None] + 0.3 * torch.randn(16, 4, 6, 8, generator=gen)).flatten(1, 2)
        centres = axes.expand(16, 4, 8)
        target = pixels.view(16, 4, 6, 8).sum(2)
        loss = ((module(centres, pixels) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert end < 0.1 * start, f"loss {start:.3f} -> {end:.3f}"


def test_kmeans_cross_errors():
    with pytest.raises(ShapeError, match="pixels"):
        KMeansCrossAttention(8, 1)(torch.randn(1, 3, 8))
    with pytest.raises(ShapeError, match="normalizer"):
        KMeansCrossAttention(8, 1, normalizer="softmax")
