"""Group Pose's grouped self-attention (Liu et al., 2023, "Group Pose: A Simple Baseline for End-to-End
Multi-person Pose Estimation", arXiv 2308.07313).

The decoder holds ``instances x (keypoints + 1)`` queries, instance-major: query
``n * (keypoints + 1) + t`` is type ``t`` (0: the instance query, 1..K: its keypoint queries) of
instance ``n``. Against one self-attention over all of them, two run in sequence, each with a
residual: within-instance attention (a query sees the K + 1 queries of its instance:
``BlockLocal(K + 1)``), then same-type across-instance attention (a query sees the queries of its
type in every instance: ``Dilated(instances - 1, K + 1)``). Both are plain patterns, so both calls
run on the block-sparse backend, each pair-count ``N (K+1)^2`` and ``N^2 (K+1)`` instead of
``N^2 (K+1)^2``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ShapeError
from ..patterns import BlockLocal, Dilated
from .attention import MultiHeadAttention, check_inputs


class GroupPoseAttention(nn.Module):
    """Within-instance then same-type across-instance self-attention over ``(batch, instances *
    (keypoints + 1), dim)`` queries (module docstring). Returns the update of the two residual
    sub-layers, ``h + across(h) - x`` with ``h = x + within(x)``, so ``x + module(x)`` is the pair.
    ``**options`` go to both ``MultiHeadAttention`` layers."""

    def __init__(self, dim: int, heads: int, instances: int, keypoints: int, **options):
        super().__init__()
        for name, value, least in (("instances", instances, 1), ("keypoints", keypoints, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ShapeError(f"{name} must be a positive integer, got {value!r}")
        if "pattern" in options:
            raise ShapeError("GroupPoseAttention sets its own patterns; drop pattern=")
        self.dim, self.instances, self.keypoints = dim, instances, keypoints
        group = keypoints + 1
        self.within = MultiHeadAttention(dim, heads, pattern=BlockLocal(group), **options)
        self.across = MultiHeadAttention(dim, heads, pattern=Dilated(instances - 1, group), **options)

    def forward(self, x: Tensor) -> Tensor:
        check_inputs(x, None, self.dim)
        expected = self.instances * (self.keypoints + 1)
        if x.shape[1] != expected:
            raise ShapeError(f"x has {x.shape[1]} queries; GroupPoseAttention was built for {self.instances} "
                             f"instances x {self.keypoints + 1} queries = {expected}")
        h = x + self.within(x)
        return h + self.across(h) - x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, instances={self.instances}, keypoints={self.keypoints}"
