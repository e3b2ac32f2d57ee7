"""Routing's assignment of tokens to clusters in the native kernel (``nearest_centroids``): the
nearest centroid of each point against float64 scores and ``torch.argmax``, ties and NaN as
``torch.argmax`` ranks them, the fallback, bad input, and ``Routing`` running it; and the points
themselves (``routing_points``) against torch's normalisations."""

from __future__ import annotations

import pytest
import torch

from multihead.backends import native
from multihead.backends.native import cluster
from multihead.patterns import Full, Routing

needs_kernel = pytest.mark.skipif(native.kernel() is None, reason="native kernel not built")


def _unit(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)


@needs_kernel
@pytest.mark.parametrize("n,clusters,dim", [(1, 1, 1), (7, 3, 5), (33, 16, 64), (100, 17, 12), (259, 40, 3)])
def test_each_point_gets_its_nearest_centroid(n, clusters, dim):
    """Point counts that are and are not whole groups of eight, centroid counts past one vector of
    lanes and not filling the last, small and odd depths; against float64 scores (the kernel's
    float32 sums run in another order than torch.matmul's, so a point whose two best scores are
    within a rounding may go either way) and against the torch path where the gap is wider."""
    points, centroids = _unit(2, 3, n, dim, seed=n), _unit(2, 3, clusters, dim, seed=clusters)
    got = cluster.nearest_centroids(points, centroids)
    assert got.shape == (2, 3, n) and got.dtype == torch.long
    scores = points.double() @ centroids.double().transpose(-2, -1)
    top2 = scores.topk(min(2, clusters), -1).values
    assert (scores.max(-1).values - scores.gather(-1, got.unsqueeze(-1)).squeeze(-1)).max() <= 1e-5
    clear = top2[..., 0] - top2[..., -1] > 1e-5 if clusters > 1 else torch.ones_like(got, dtype=torch.bool)
    want = torch.matmul(points, centroids.transpose(-2, -1)).argmax(-1)
    assert torch.equal(got[clear], want[clear])


@needs_kernel
def test_ties_go_to_the_first_centroid_and_nan_ranks_first():
    centroids = _unit(1, 2, 5, 8, seed=1)
    centroids[:, :, 3] = centroids[:, :, 1]  # two equal centroids: the first of them wins
    points = torch.cat([centroids[:, :, 1:2], torch.zeros(1, 2, 1, 8), _unit(1, 2, 3, 8, seed=2)], 2)
    points[0, 1, 3, 2] = float("nan")  # every score of this point NaN: the first
    got = cluster.nearest_centroids(points, centroids)
    assert torch.equal(got[..., :2], torch.tensor([[[1, 0], [1, 0]]]))  # a zero point scores 0 everywhere
    assert torch.equal(got, torch.matmul(points, centroids.transpose(-2, -1)).argmax(-1))
    centroids[0, 0, 2, 0] = float("nan")  # one NaN score per point: it outranks every number
    assert torch.equal(cluster.nearest_centroids(points, centroids)[0, 0], torch.full((5,), 2))


@needs_kernel
def test_centroids_broadcast_over_batch_and_heads_and_strided_points():
    points = _unit(2, 3, 40, 16, seed=3)
    centroids = _unit(1, 1, 6, 16, seed=4)
    got = cluster.nearest_centroids(points.transpose(1, 2).contiguous().transpose(1, 2), centroids)
    assert torch.equal(got, cluster.nearest_centroids(points, centroids.expand(2, 3, 6, 16).contiguous()))


@needs_kernel
@pytest.mark.parametrize("n,clusters,dim", [(1, 1, 4), (300, 5, 7), (600, 16, 64)])
def test_a_kmeans_step_sums_what_index_add_sums(monkeypatch, n, clusters, dim):
    """The kernel's sums and counts per cluster against the torch path's ``index_add_`` and
    ``bincount`` (units of 256 points: one, two and three of them), an empty cluster included."""
    points, centroids = _unit(2, 3, n, dim, seed=n), _unit(2, 3, clusters, dim, seed=dim)
    if clusters > 1:
        centroids[:, :, -1] = -centroids[:, :, 0]  # the far side of another centroid: no point nearer
        points = torch.where((points @ centroids[:, :, -1:].transpose(-2, -1)) > 0, -points, points)
    assign, sums, counts = cluster.assign_and_sum(points, centroids)
    monkeypatch.setattr(cluster, "kernel", lambda: None)
    want = cluster.assign_and_sum(points, centroids)
    assert torch.equal(assign, want[0]) and torch.equal(counts, want[2])
    torch.testing.assert_close(sums, want[1], rtol=1e-5, atol=1e-5)
    assert counts.sum(-1).eq(n).all()
    if clusters > 1:
        assert counts[..., -1].eq(0).all() and sums[..., -1, :].eq(0).all()


def test_the_torch_path_serves_other_types_and_no_kernel(monkeypatch):
    points, centroids = _unit(1, 2, 30, 4, seed=5), _unit(1, 2, 3, 4, seed=6)
    want = torch.matmul(points.double(), centroids.double().transpose(-2, -1)).argmax(-1)
    assert torch.equal(cluster.nearest_centroids(points.double(), centroids.double()), want)
    monkeypatch.setattr(cluster, "kernel", lambda: None)
    assert torch.equal(cluster.nearest_centroids(points, centroids),
                       torch.matmul(points, centroids.transpose(-2, -1)).argmax(-1))


@needs_kernel
def test_bad_input_is_refused():
    ext = native.kernel()
    points, centroids = _unit(1, 2, 10, 4, seed=7), _unit(1, 2, 3, 4, seed=8)
    with pytest.raises(RuntimeError, match="float32"):
        ext.nearest_centroids(points.double(), centroids.double())
    with pytest.raises(RuntimeError, match="do not match"):
        ext.nearest_centroids(points, centroids[..., :3])
    with pytest.raises(RuntimeError, match="do not match"):
        ext.nearest_centroids(points, torch.empty(1, 2, 0, 4))
    with pytest.raises(RuntimeError, match="dim"):
        ext.nearest_centroids(points[0], centroids)


@needs_kernel
def test_routing_assigns_through_the_kernel(monkeypatch):
    """Every k-means step and the final assignment of a float32 ``Routing`` run in the kernel."""
    calls = []
    real = native.kernel()

    class Counting:  # the kernel, counting its assignments
        def __getattr__(self, name):
            return getattr(real, name)

        def nearest_centroids(self, *args):
            calls.append(1)
            return real.nearest_centroids(*args)

    monkeypatch.setattr(cluster, "kernel", Counting)
    q, k = _unit(1, 4, 64, 16, seed=9), _unit(1, 2, 64, 16, seed=10)
    with_kernel = Routing(4, iterations=3).resolve(q, k, 0.25, Full()).pattern.cluster
    assert len(calls) == 4
    monkeypatch.setattr(cluster, "kernel", lambda: None)
    assert torch.equal(with_kernel, Routing(4, iterations=3).resolve(q, k, 0.25, Full()).pattern.cluster)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_routing_points_are_the_unit_sum_of_unit_query_and_key(monkeypatch, dtype, kv_heads):
    """The kernel's one pass makes torch's points: normalize(normalize(q) + normalize(k)) per token,
    k's head broadcast to its query heads, float32 whatever the input; a zero query or key adds
    nothing (its norm floored at 1e-12)."""
    from multihead.patterns.dynamic import _routing_points

    gen = torch.Generator().manual_seed(kv_heads)
    q = (torch.randn(2, 4, 37, 24, generator=gen) * 3).to(dtype)
    k = (torch.randn(2, kv_heads, 37, 24, generator=gen) * 3).to(dtype)
    q[0, 1, 5], k[1, 0, 7] = 0, 0  # norms floored: a zero query adds nothing, a zero key neither
    got = _routing_points(q, k)
    qf, kf = q.double(), k.double().repeat_interleave(4 // kv_heads, dim=1)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got.double(), unit(unit(qf) + unit(kf)), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(cluster, "kernel", lambda: None)  # the torch path gives the same points
    torch.testing.assert_close(got, _routing_points(q, k), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_routing_points_refuse_bad_input():
    ext = native.kernel()
    q, k, out = torch.randn(1, 4, 8, 6), torch.randn(1, 2, 8, 6), torch.empty(1, 4, 8, 6)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        ext.routing_points(q, torch.randn(1, 3, 8, 6), out)
    with pytest.raises(RuntimeError, match="one dtype"):
        ext.routing_points(q, k.double(), out)
    with pytest.raises(RuntimeError, match="float32 tensor of q's shape"):
        ext.routing_points(q, k, out.double())
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 or float16"):
        ext.routing_points(q.int(), k.int(), out)


def test_explain_says_how_routing_assigned(monkeypatch):
    import multihead as mh

    q, k, v = _unit(1, 2, 64, 16, seed=11), _unit(1, 2, 64, 16, seed=12), _unit(1, 2, 64, 16, seed=13)
    said = mh.explain(q, k, v, pattern=Routing(4), show=False).pattern
    by = "the native kernel" if native.kernel() is not None else "torch.matmul and argmax"
    assert said == f"Routing(clusters=4, iterations=3): tokens assigned to their nearest centroids by {by}"
    monkeypatch.setattr(cluster, "kernel", lambda: None)
    assert mh.explain(q, k, v, pattern=Routing(4), show=False).pattern.endswith("by torch.matmul and argmax")
