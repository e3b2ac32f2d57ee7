"""``Routing``'s assignment of tokens to clusters: each point's nearest centroid, in the native
kernel where it runs.

``torch.matmul`` then ``argmax(-1)`` writes an ``(n, clusters)`` score tensor and reads it back, and
an argmax over a last dimension of 16 is slow on CPU (at 4k tokens, 8 heads and 16 clusters the pair
took about 1 ms, four times a resolve). The kernel's ``nearest_centroids`` (``cluster.cpp``) makes
each point's scores in registers and keeps the first largest, and for a k-means step
(``assign_and_sum``) adds each point to its cluster's sum as it goes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernel


def native_assignment(points: Tensor, centroids: Tensor) -> bool:
    """Whether ``nearest_centroids`` runs in the kernel on these tensors: CPU, float32, kernel built."""
    cpu = points.device.type == "cpu" and centroids.device.type == "cpu"
    return cpu and points.dtype == centroids.dtype == torch.float32 and kernel() is not None


def nearest_centroids(points: Tensor, centroids: Tensor) -> Tensor:
    """The index ``(B, H, N)`` of each point's nearest centroid by dot product: ``points`` ``(B, H,
    N, D)`` against ``centroids`` ``(B, H, C, D)`` (broadcast over batch and heads), the first of
    equal scores, NaN above every number (``torch.argmax``'s contract). float32 on CPU runs in the
    native kernel, whose float32 sums run in the depth's order: a point whose two best scores differ
    by a rounding may get the other one than ``torch.matmul`` gives it. Anything else is
    ``torch.matmul(points, centroids^T).argmax(-1)``."""
    if not native_assignment(points, centroids):
        return torch.matmul(points, centroids.transpose(-2, -1)).argmax(-1)
    return _in_kernel(points, centroids, sums=False)[0]


def assign_and_sum(points: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A k-means step's data: each point's nearest centroid ``(B, H, N)`` (as ``nearest_centroids``),
    each cluster's sum of its points ``(B, H, C, D)`` and their count ``(B, H, C)``. The kernel adds
    the points up as it assigns them; elsewhere ``index_add_`` and ``bincount`` over the
    assignments (one pass over the points each, no one-hot matrix)."""
    if native_assignment(points, centroids):
        return tuple(_in_kernel(points, centroids, sums=True))
    batch, heads, _, dim = points.shape
    clusters = centroids.shape[2]
    assign = nearest_centroids(points, centroids)
    offsets = torch.arange(0, batch * heads * clusters, clusters, device=points.device).view(batch, heads, 1)
    flat = (assign + offsets).flatten()
    sums = points.new_zeros(batch * heads * clusters, dim).index_add_(0, flat, points.reshape(-1, dim))
    counts = torch.bincount(flat, minlength=batch * heads * clusters)
    return assign, sums.view(batch, heads, clusters, dim), counts.view(batch, heads, clusters)


def _in_kernel(points: Tensor, centroids: Tensor, sums: bool) -> list[Tensor]:
    """The kernel's ``nearest_centroids``, the centroids broadcast to every (batch, head)."""
    batch, heads = points.shape[:2]
    return kernel().nearest_centroids(points, centroids.expand(batch, heads, *centroids.shape[2:]), sums)
