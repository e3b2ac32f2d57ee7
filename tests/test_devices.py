"""Every pattern family of the block-sparse issue on every device there is: forward and gradients
(q, k, v and a learnable relative-bias table) on the device against a float64 reference on the CPU,
under the tolerance rule of ``conftest``.

On the CPU this runs ``backend="auto"`` (what a user gets). With CUDA it also runs block-sparse,
FlexAttention, SDPA and the head-group split there, each where it can serve: the checks a GPU session runs with
``make test-gpu``; without CUDA they skip.
"""

from __future__ import annotations

import copy

import pytest
import torch

import multihead as mh
from multihead.backends import BACKENDS
from multihead.patterns import (CrossShapedWindow, Dilated, GlobalTokens, Neighborhood, Routing,
                                SlidingWindow, TopK)
from multihead.request import make_request
from multihead.scores import RelativePositionBias

from test_blocksparse import PATTERNS as SEQUENCE_PATTERNS, _check
from test_blocksparse_tiles import GRID, GRID_PATTERNS

B, H, HKV, D = 2, 4, 2, 16
L = 37  # the length test_blocksparse's sequence patterns are made for
N = GRID[0] * GRID[1]

#: name -> (pattern factory, q_len, kv_len)
CASES = {
    **{f"seq_{name}": (make, L, L) for name, make in SEQUENCE_PATTERNS.items()},
    "seq_dilated": (lambda: Dilated(4, 2), L, L),
    "seq_global_or_window": (lambda: GlobalTokens(3) | SlidingWindow(4, 4), L, L),
    **{f"grid_{name}": (make, N, N) for name, make in GRID_PATTERNS.items()},
    "grid_neighborhood_big_kernel": (lambda: Neighborhood((7, 9), grid=GRID), N, N),
    "grid_cswin_per_head": (lambda: CrossShapedWindow(2, GRID, H), N, N),
    "topk": (lambda: TopK(6), L, L),
    "routing": (lambda: Routing(3), L, L),
}
DYNAMIC = {"topk", "routing"}  # chosen from q and k: compared where the choice is exact (fp32)

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
RUNS = [pytest.param("cpu", "auto", id="cpu-auto")] + [
    pytest.param("cuda", backend, id=f"cuda-{backend}", marks=cuda_only)
    for backend in ("auto", "blocksparse", "flex", "sdpa", "heads")]


def _inputs(seed: int, q_len: int, kv_len: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, q_len, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, HKV, kv_len, D, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.randn(B, H, q_len, D, generator=gen, dtype=torch.float64)


def _run(backend: str, device: str, dtype, pattern, score, q, k, v, dout):
    """Output and gradients (q, k, v, bias table) back on the CPU in float64; None if ``backend``
    cannot serve the request."""
    score = copy.deepcopy(score).to(device)  # its own table (float32), whose gradient is this run's
    leaves = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in (q, k, v)]
    req = make_request(*leaves, pattern=pattern, score=score)
    if backend != "auto" and BACKENDS[backend].unsupported(req) is not None:
        return None
    out = mh.attention(*leaves, pattern=pattern, score=score, backend=backend)
    assert out.device.type == device and out.dtype == dtype
    out.backward(dout.to(device=device, dtype=dtype))
    return [t.detach().cpu().double() for t in (out, *(x.grad for x in leaves), score.table.grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device, backend", RUNS)
@pytest.mark.parametrize("case", CASES)
def test_device_matches_cpu_reference(case, device, backend, dtype):
    if case in DYNAMIC and dtype != torch.float32:
        pytest.skip("a dynamic choice made in bf16 may differ from the float64 one; fp32 only")
    if backend == "flex" and dtype != torch.float32:
        pytest.skip("FlexAttention compiles per pattern: fp32 only, to keep the GPU run short")
    make, q_len, kv_len = CASES[case]
    q, k, v, dout = _inputs(0, q_len, kv_len)
    score = RelativePositionBias(H, num_buckets=8, max_distance=20)
    truth = _run("reference", "cpu", torch.float64, make(), score, q, k, v, dout)
    base = _run("reference", "cpu", dtype, make(), score, q, k, v, dout)
    got = _run(backend, device, dtype, make(), score, q, k, v, dout)
    if got is None:
        pytest.skip(f"{backend} cannot serve {case} on {device}")
    _check(got, truth, base, dtype, ["out", "dq", "dk", "dv", "dtable"])
