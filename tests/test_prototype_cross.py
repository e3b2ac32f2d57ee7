"""PEM's prototype-based masked cross-attention against a transcription of the authors' PEM_CA
(forward and gradients), the hard argmax, the empty-mask rule, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import gratings_losses
from torch import nn

from multihead.errors import ShapeError
from multihead.nn.prototype_cross import KeyArgmax, PrototypeCrossAttention


def authors_forward(m: PrototypeCrossAttention, q, x, memory_mask, pos, query_pos):
    """The authors' PEM_CA.forward and most_similar_tokens (queries (Q, B, C), features (B, C, H, W))."""
    res = q
    x, q = x + pos, q + query_pos
    B, C, H, W = x.shape
    query = m.to_query.out(m.to_query.conv(m.to_query.norm(x)).view(B, C, H * W).permute(0, 2, 1))
    key = m.to_key(q.permute(1, 0, 2))
    query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
    N, Q, D, h = H * W, key.shape[1], C // m.heads, m.heads
    xs = query.view(B, N, h, D).permute(0, 2, 1, 3)
    qs = key.view(B, Q, h, D).permute(0, 2, 1, 3)
    sim = torch.einsum("bhnc, bhqc -> bhnq", xs, qs)
    mask = (memory_mask.flatten(2).permute(0, 2, 1).detach() < 0.0).bool()
    mask = mask.unsqueeze(1).expand(-1, h, -1, -1).clone()
    mask[torch.all(mask.sum(2) == mask.shape[2], dim=2)] = False
    sim.masked_fill_(mask, float("-inf"))
    index = torch.argmax(sim, dim=2)
    query = torch.gather(xs, 2, index.unsqueeze(-1).expand(-1, -1, -1, D)).permute(0, 2, 1, 3).reshape(B, Q, C)
    out = F.normalize(m.proj(query * key), dim=1) * m.alpha + query
    return m.final(out).permute(1, 0, 2) + res


def test_prototype_cross_attention_is_the_authors_pem_ca():
    torch.manual_seed(0)
    m = PrototypeCrossAttention(16, 4).double()
    q = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 6, 7, 16, dtype=torch.float64, requires_grad=True)
    pos, query_pos = torch.randn_like(x), torch.randn_like(q)
    memory_mask = torch.randn(2, 5, 6, 7, dtype=torch.float64)  # every query keeps some pixels
    got = m(q, x, memory_mask, pos, query_pos)
    want = authors_forward(m, q.transpose(0, 1), x.permute(0, 3, 1, 2), memory_mask, pos.permute(0, 3, 1, 2),
                           query_pos.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(got, want)
    inputs = [q, x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(got.square().sum(), inputs), torch.autograd.grad(want.square().sum(), inputs)):
        torch.testing.assert_close(a, b)


def test_key_argmax_is_one_hot_on_the_best_allowed_key():
    logits = torch.tensor([[[[0.1, 2.0, float("-inf"), 1.0], [3.0, float("-inf"), 3.0, -1.0]]]])
    assert KeyArgmax().weights(logits, 4).tolist() == [[[[0, 1, 0, 0], [1, 0, 0, 0]]]]


def test_a_query_whose_mask_is_empty_looks_everywhere():
    torch.manual_seed(0)
    m = PrototypeCrossAttention(8, 2).eval()
    q, x = torch.randn(1, 3, 8), torch.randn(1, 4, 4, 8)
    mask = torch.randn(1, 3, 4, 4)
    mask[0, 1] = -1.0  # query 1 excludes every pixel
    unmasked = mask.clone()
    unmasked[0, 1] = 1.0
    torch.testing.assert_close(m(q, x, mask)[:, 1], m(q, x, unmasked)[:, 1])
    only = [torch.full((1, 3, 4, 4), -1.0) for _ in range(2)]
    only[0][0, :, 1, 1] = only[1][0, :, 2, 3] = 1.0  # one pixel allowed: the prototype of every head
    assert not torch.allclose(m(q, x, only[0]), m(q, x, only[1]))


def test_pem_queries_learn_to_read_gratings():
    torch.manual_seed(0)

    class Tiny(nn.Module):  # patches of 2, one learned query updated by PEM, classified
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(1, 32, 2, stride=2)
            self.query = nn.Parameter(torch.randn(1, 1, 32) * 0.1)
            self.pem = PrototypeCrossAttention(32, 4)
            self.head = nn.Linear(32, 4)

        def forward(self, images):
            features = self.embed(images).permute(0, 2, 3, 1)
            return self.head(self.pem(self.query.expand(len(images), -1, -1), features)[:, 0])

    losses = gratings_losses(Tiny(), 60)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_prototype_cross_attention_errors():
    m = PrototypeCrossAttention(8, 2)
    with pytest.raises(ShapeError, match="divide"):
        PrototypeCrossAttention(8, 3)
    with pytest.raises(ShapeError, match="channels-last"):
        m(torch.randn(1, 3, 8), torch.randn(1, 8, 4, 4))
    with pytest.raises(ShapeError, match="memory_mask"):
        m(torch.randn(1, 3, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 2, 4, 4))
