"""Group Pose's grouped self-attention against its two masks written out, forward and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from multihead.errors import ShapeError
from multihead.nn.group_pose import GroupPoseAttention


def _masked_mha(module, x, mask):
    """Standard multi-head attention of ``module``'s weights with a dense boolean mask."""
    q, k, v = module.project(x, x)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return module.combine(logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v, x)


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa", "auto"])
def test_two_masked_attentions_in_sequence_forward_and_gradients(backend):
    torch.manual_seed(0)
    instances, keypoints = 5, 3
    module = GroupPoseAttention(16, 2, instances, keypoints, backend=backend).double()
    n = instances * (keypoints + 1)
    instance = torch.arange(n) // (keypoints + 1)
    kind = torch.arange(n) % (keypoints + 1)
    within = instance[:, None] == instance[None, :]  # the K + 1 queries of one instance
    across = kind[:, None] == kind[None, :]  # one type (instance query, or keypoint t) in every instance
    x = torch.randn(2, n, 16, dtype=torch.float64, requires_grad=True)
    got = module(x)
    x2 = x.detach().clone().requires_grad_()
    h = x2 + _masked_mha(module.within, x2, within)
    want = h + _masked_mha(module.across, h, across) - x2
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(x.grad, x2.grad)
    assert module.within.pattern.density(n, n) == (keypoints + 1) / n
    assert module.across.pattern.density(n, n) == 1 / (keypoints + 1)


def test_group_pose_trains_to_pass_instance_and_type_information():
    """Every query must add the mean of its instance's queries and the mean of its type's queries
    (information only the two grouped attentions reach)."""
    torch.manual_seed(0)
    instances, keypoints, dim = 4, 3, 16
    module = GroupPoseAttention(dim, 2, instances, keypoints)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(150):
        x = torch.randn(16, instances, keypoints + 1, dim, generator=gen)
        target = x + x.mean(2, keepdim=True) + x.mean(1, keepdim=True)
        x, target = x.flatten(1, 2), target.flatten(1, 2)
        loss = ((x + module(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert end < 0.3 * start, f"loss {start:.3f} -> {end:.3f}"


def test_group_pose_errors():
    with pytest.raises(ShapeError, match="keypoints"):
        GroupPoseAttention(16, 2, 4, 0)
    with pytest.raises(ShapeError, match="built for"):
        GroupPoseAttention(16, 2, 4, 3)(torch.randn(1, 15, 16))
    with pytest.raises(ShapeError, match="pattern"):
        GroupPoseAttention(16, 2, 4, 3, pattern=None)
