"""Fusing attention layers by optimal transport of their heads: a permuted copy is recovered exactly,
aligned fusion keeps the function where plain averaging does not, and the plan is a proper coupling."""

from __future__ import annotations

import pytest
import torch

from multihead.errors import ShapeError
from multihead.fusion import fuse, head_transport, sinkhorn
from multihead.nn import MultiHeadAttention


def _permuted(m: MultiHeadAttention, perm: torch.Tensor, noise: float = 0.0) -> MultiHeadAttention:
    """``m`` with its heads reordered by ``perm`` (the same function) plus optional noise."""
    out = MultiHeadAttention(m.dim, m.heads)
    h, d = m.heads, m.head_dim
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            src, dst = getattr(m, name), getattr(out, name)
            dst.weight.copy_(src.weight.view(h, d, -1)[perm].reshape(src.weight.shape))
            dst.bias.copy_(src.bias.view(h, d)[perm].reshape(-1))
        out.out_proj.weight.copy_(m.out_proj.weight.view(-1, h, d)[:, perm].reshape(m.out_proj.weight.shape))
        out.out_proj.bias.copy_(m.out_proj.bias)
        for p in out.parameters():
            p.add_(noise * torch.randn_like(p))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_sinkhorn_plan_has_uniform_marginals(seed):
    cost = torch.rand(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    plan = sinkhorn(cost)
    fifth = torch.full((5,), 0.2, dtype=torch.float64)
    torch.testing.assert_close(plan.sum(0), fifth)  # the last update makes the columns exact
    torch.testing.assert_close(plan.sum(1), fifth, atol=1e-8, rtol=0)  # rows to the stopping tolerance
    assert (plan >= 0).all()


def test_a_head_permuted_copy_is_aligned_and_fused_back_exactly():
    torch.manual_seed(0)
    a = MultiHeadAttention(32, 4)
    perm = torch.tensor([2, 0, 3, 1])
    b = _permuted(a, perm)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(b(x), a(x))  # the same function
    t = head_transport(a, b)
    assert torch.equal(t.argmax(1), perm.argsort())  # a's head i sits at b's position perm^-1(i)
    torch.testing.assert_close(fuse(a, b)(x), a(x), atol=1e-5, rtol=1e-4)


def test_aligned_fusion_keeps_the_function_where_plain_averaging_does_not():
    torch.manual_seed(0)
    a = MultiHeadAttention(32, 8)
    b = _permuted(a, torch.randperm(8), noise=0.01)
    x = torch.randn(4, 10, 32)
    target = a(x)
    aligned = (fuse(a, b)(x) - target).norm() / target.norm()
    plain = a.__class__(32, 8)
    plain.load_state_dict({k: (a.state_dict()[k] + b.state_dict()[k]) / 2 for k in a.state_dict()})
    naive = (plain(x) - target).norm() / target.norm()
    print(f"fusion: aligned {aligned:.3f}, plain averaging {naive:.3f}")
    assert aligned < 0.1 and naive > 4 * aligned


def test_fusion_errors():
    a = MultiHeadAttention(32, 4)
    with pytest.raises(ShapeError, match="weight"):
        fuse(a, a, weight=2.0)
    with pytest.raises(ShapeError, match="kv_heads"):
        fuse(MultiHeadAttention(32, 4, 2), MultiHeadAttention(32, 4, 2))
    with pytest.raises(ShapeError, match="differ"):
        fuse(a, MultiHeadAttention(32, 4, head_dim=4))
