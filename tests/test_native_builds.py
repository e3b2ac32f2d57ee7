"""The native kernel built for CPUs without AVX-512 BF16 (AVX-512 with VNNI, AVX-512 alone, AVX2, no
vector extension): this machine has it, so ``make test`` never compiles the other branches. Each
build runs in a process of its own (one kernel per process), from a cache folder of its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from multihead.backends import native

AVX512 = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
AVX512_VNNI = AVX512 + ",avx512_vnni"
AVX2 = "avx2,fma,f16c"

_CHECK = """
import torch
import multihead as mh
import multihead.backends.native as native
from multihead.backends.native import select
from multihead.patterns import KeySelection, SlidingWindow

native.cpu_flags = lambda: set({flags!r}.split(",")) - {{""}}
ext = native.kernel()
assert ext is not None, native.describe()
assert not ext.bf16_pairs()
assert "CPU: {cpu}" in native.describe(), native.describe()

gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 4, 300, 40, generator=gen) for _ in range(3))
want = mh.attention(q.double(), k.double(), v.double(), pattern=SlidingWindow(20, 7), backend="reference")
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)):
    got = mh.attention(q.to(dtype), k.to(dtype), v.to(dtype), pattern=SlidingWindow(20, 7), backend="blocksparse")
    err = (got.double() - want).abs().max().item()
    assert err < tol, (dtype, err)
# key lists: one query row a tile, four tiles at a time
idx = torch.stack([torch.randperm(300, generator=gen)[:16] for _ in range(4 * 300)]).view(1, 4, 300, 16)
lists = KeySelection(idx, torch.ones_like(idx, dtype=torch.bool), 300)
want = mh.attention(q.double(), k.double(), v.double(), pattern=lists, backend="reference")
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)):
    got = mh.attention(q.to(dtype), k.to(dtype), v.to(dtype), pattern=lists, backend="blocksparse")
    err = (got.double() - want).abs().max().item()
    assert err < tol, ("key lists", dtype, err)
# their backward: each head's pairs sorted by key, each key's gradients summed from its pairs
leaves = [t.clone().requires_grad_() for t in (q, k, v)]
ref = [t.double().requires_grad_() for t in (q, k, v)]
grad = torch.randn(1, 4, 300, 40, generator=gen)
mh.attention(*leaves, pattern=lists, backend="blocksparse").backward(grad)
mh.attention(*ref, pattern=lists, backend="reference").backward(grad.double())
for got, want in zip(leaves, ref):
    assert (got.grad.double() - want.grad).abs().max().item() < 1e-4, "key lists backward"

keep = 9
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    scores = q.to(dtype).double() @ k.to(dtype).double().transpose(-2, -1)  # of the values it was given
    indices = torch.empty(1, 4, 300, keep, dtype=torch.long)
    valid = torch.empty(1, 4, 300, keep, dtype=torch.bool)
    screened = select.top_keys_of_products(q.to(dtype), k.to(dtype), keep, None, None, indices, valid, screen_keys=0)
    # int8 products screen float32 rows where the build has AVX-512 VNNI; nothing else is screened
    int8 = dtype == torch.float32 and "avx512_vnni" in {flags!r}
    assert select.screens() == (["int8"] if "avx512_vnni" in {flags!r} else [])
    assert screened == ((4 * 300, "int8") if int8 else (0, "")), screened
    plain = torch.empty_like(indices), torch.empty_like(valid)
    assert select.top_keys_of_products(q.to(dtype), k.to(dtype), keep, None, None, *plain, screen_keys=-1) == (0, "")
    assert torch.equal(plain[0], indices) and torch.equal(plain[1], valid)
    got = scores.gather(-1, indices).sort(-1).values
    best = scores.topk(keep, -1).values.sort(-1).values
    assert (got - best).abs().max().item() < 1e-3, dtype
    assert valid.all()
points = torch.nn.functional.normalize(torch.randn(1, 2, 301, 64), dim=-1)
centroids = torch.nn.functional.normalize(torch.randn(1, 2, 19, 64), dim=-1)
assign, sums, counts = ext.nearest_centroids(points, centroids, True)
scores = points.double() @ centroids.double().transpose(-2, -1)
assert (scores.max(-1).values - scores.gather(-1, assign.unsqueeze(-1)).squeeze(-1)).max() < 1e-5
members = torch.nn.functional.one_hot(assign, 19).double()
torch.testing.assert_close(sums.double(), members.transpose(-2, -1) @ points.double(), rtol=1e-5, atol=1e-5)
assert torch.equal(counts, members.sum(2).long())
# routing's points (a width of 20: whole vectors and a tail in every vector width), and the limit
rq, rk = torch.randn(1, 4, 33, 20, generator=gen), torch.randn(1, 2, 33, 20, generator=gen)
unit = lambda x: torch.nn.functional.normalize(x, dim=-1)
out = torch.empty(1, 4, 33, 20)
ext.routing_points(rq, rk, out)
torch.testing.assert_close(out.double(), unit(unit(rq.double()) + unit(rk.double()).repeat_interleave(2, 1)),
                           rtol=1e-6, atol=1e-6)
assert ext.multiply_add_rate(1000) > 0
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(native.kernel() is None, reason="no compiler here: the kernel does not build")
@pytest.mark.parametrize("flags,cpu", [(AVX512_VNNI, "avx2, avx512_vnni, avx512f"), (AVX512, "avx2, avx512f"),
                                       (AVX2, "avx2"), ("", "baseline")],
                         ids=["avx512-vnni-no-bf16", "avx512-no-bf16", "avx2", "baseline"])
def test_kernel_builds_and_runs_without_avx512_bf16(tmp_path, flags, cpu):
    """Attention through the kernel against the float64 reference (float32, bf16, fp16) on a window
    and on key lists (and the lists' float32 gradients), the fused top-k choice against float64 scores (screened by int8 products
    where the build has VNNI, the plain choice's keys, else unscreened: nothing to screen with), and
    routing's k-means step (19 centroids: lanes of 8 or 16, the last vector part full; the sums of
    301 points, two units of 256), routing's points, and the multiply-add rate."""
    env = dict(os.environ, MULTIHEAD_CACHE=str(tmp_path))
    env.pop("MULTIHEAD_NATIVE", None)
    run = subprocess.run([sys.executable, "-c", _CHECK.format(flags=flags, cpu=cpu)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
