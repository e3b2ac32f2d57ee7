"""The native kernel's output buffers kept for reuse (``pool.cpp``): a dead output's buffer serves
the next one of its size, with the rows no tile writes and the gradient accumulators cleared; a
pooled tensor behaves as any other; the idle bytes are bounded, inspectable and releasable. The
large tensors made around the kernel come from the same buffers: gradients in the inputs' dtype,
the ``heads`` backend's joins of its runs, contiguous copies of a run's heads."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

import multihead as mh
from multihead.backends import BACKENDS, native
from multihead.backends.native import tiles
from multihead.patterns import SlidingWindow, TopK
from multihead.request import make_request

from conftest import max_error, naive_attention

B, H, N, D = 1, 4, 2048, 64  # outputs of 2 MiB in float32: above the 1 MiB the pool starts at


def _kernel():
    if os.environ.get("MULTIHEAD_NATIVE", "1") == "0" or native.kernel() is None:
        pytest.skip("the native kernel is not available")
    ext = native.kernel()
    if ext.pool_limit_bytes() == 0:
        pytest.skip("output reuse is off (MULTIHEAD_NATIVE_POOL_MIB=0, or an AddressSanitizer build)")
    return ext


def _inputs(seed=0, n=N):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=gen) for _ in range(3)]


def _forward(ext, table, q, k, v):
    n = q.shape[2]
    return ext.forward(q, k, v, *table.arrays(), D ** -0.5, None, None, None, None, 0.0, n - 1, 0.0, 0, None)


def _lists_table(q, k, v, rows):
    """A key-list table (TopK) over the first ``rows`` queries only: the others are in no tile."""
    lists = make_request(q, k, v, pattern=TopK(16)).pattern.key_lists()
    full = tiles.from_key_lists(*lists)
    width = 16
    return tiles.TileTable(q_rows=full.q_rows[:rows], tile_q=full.tile_q[:rows + 1],
                           tile_k=full.tile_k[:rows + 1], k_idx=full.k_idx[:, :rows * width].contiguous(),
                           tile_m=full.tile_m[:rows], mask=full.mask, lb=full.lb, lh=full.lh, pairs=rows * width)


def _window_table(q, k, v):
    return BACKENDS["blocksparse"].plan(make_request(q, k, v, pattern=SlidingWindow(64, 64)), native=True).table


def test_a_dead_output_serves_the_next_of_its_size():
    ext = _kernel()
    q, k, v = _inputs()
    table = _window_table(q, k, v)
    out, _ = _forward(ext, table, q, k, v)
    first, where = out.clone(), out.data_ptr()
    before = native.idle_memory()
    del out
    assert native.idle_memory() >= before + B * H * N * D * 4
    again, _ = _forward(ext, table, q, k, v)
    assert again.data_ptr() == where
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_rows_no_tile_writes_are_zero_in_a_reused_buffer():
    ext = _kernel()
    q, k, v = _inputs()
    lists = _lists_table(q, k, v, rows=N)
    dirty, _ = _forward(ext, lists, q, k, v)  # every row written: leaves values in its buffer
    where = dirty.data_ptr()
    del dirty
    half = _lists_table(q, k, v, rows=N // 2)
    out, lse = _forward(ext, half, q, k, v)
    assert out.data_ptr() == where  # the reused buffer, not a fresh (zero) one
    assert torch.all(out[:, :, N // 2:] == 0)
    assert torch.all(lse[:, :, N // 2:] == float("inf"))
    full, _ = _forward(ext, lists, q, k, v)
    torch.testing.assert_close(out[:, :, :N // 2], full[:, :, :N // 2], rtol=0, atol=0)


def test_gradient_accumulators_start_from_zero_in_reused_buffers():
    _kernel()
    q, k, v = (t.requires_grad_() for t in _inputs())
    pattern = SlidingWindow(64, 64)
    grad = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1))

    def step():  # the buffers of the output and of the three gradients
        out = mh.attention(q, k, v, pattern=pattern, backend="blocksparse")
        out.backward(grad)
        return {out.data_ptr()} | {t.grad.data_ptr() for t in (q, k, v)}

    where = step()
    first = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None  # their buffers go back to the pool
    assert step() == where  # four buffers of one size, in some order
    for got, want in zip((q.grad, k.grad, v.grad), first):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and right, not only equal (the first run may have had reused buffers too): against float64
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    naive_attention(*leaves, pattern=pattern).backward(grad.double())
    for got, want in zip((q.grad, k.grad, v.grad), leaves):
        assert max_error(got, want.grad) < 1e-4


def test_a_pooled_output_is_an_ordinary_tensor():
    ext = _kernel()
    q, k, v = _inputs()
    out, _ = _forward(ext, _window_table(q, k, v), q, k, v)
    values = out.clone()
    out.resize_(2 * B, H, N, D)  # past its buffer: moved to memory of its own, values kept
    torch.testing.assert_close(out[:B], values, rtol=0, atol=0)
    out.add_(1)
    assert out.is_contiguous() and out.stride() == (H * N * D, N * D, D, 1)
    assert torch.equal(torch.load(_roundtrip(values)), values)


def _roundtrip(t):
    buffer = io.BytesIO()
    torch.save(t, buffer)
    buffer.seek(0)
    return buffer


def test_small_outputs_are_not_pooled():
    ext = _kernel()
    q, k, v = _inputs(n=256)  # 256 KiB outputs
    native.release_memory()
    out, _ = _forward(ext, _window_table(q, k, v), q, k, v)
    del out
    assert native.idle_memory() == 0


def test_release_memory_hands_the_idle_buffers_back():
    ext = _kernel()
    q, k, v = _inputs()
    out, _ = _forward(ext, _window_table(q, k, v), q, k, v)
    del out
    held = native.idle_memory()
    assert held > 0
    assert native.release_memory() == held
    assert native.idle_memory() == 0 and native.release_memory() == 0


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


POOL_CHECK = """
import torch
from multihead.backends import native
ext = native.kernel()
q, k, v = (torch.randn(1, 4, 2048, 64) for _ in range(3))
import multihead as mh
from multihead.patterns import SlidingWindow
with torch.no_grad():
    out = mh.attention(q, k, v, pattern=SlidingWindow(64, 64), backend="blocksparse")
del out
print(ext.pool_limit_bytes(), native.idle_memory())
print(native.describe())
"""


def test_the_limit_comes_from_the_environment():
    _kernel()
    done = _run(POOL_CHECK, {"MULTIHEAD_NATIVE_POOL_MIB": "0"})
    assert done.returncode == 0, done.stderr
    sizes, line = done.stdout.splitlines()
    assert sizes.split() == ["0", "0"] and "outputs not kept for reuse" in line
    done = _run(POOL_CHECK, {"MULTIHEAD_NATIVE_POOL_MIB": "3"})  # room for one 2 MiB output
    assert done.returncode == 0, done.stderr
    sizes, line = done.stdout.splitlines()
    assert sizes.split() == [str(3 << 20), str(2 << 20)] and "up to 3 MiB idle" in line
    done = _run(POOL_CHECK, {"MULTIHEAD_NATIVE_POOL_MIB": "lots"})
    assert done.returncode != 0 and "MULTIHEAD_NATIVE_POOL_MIB must be a whole number" in done.stderr


def _dirty_pool(ext, count=8):
    """``count`` idle buffers of the (B, H, N, D) float32 size in the pool, full of NaN, so that the
    next outputs of that size are reused ones holding garbage."""
    q, k, v = _inputs()
    outs = [_forward(ext, _window_table(q, k, v), q, k, v)[0] for _ in range(count)]
    for out in outs:
        out.fill_(float("nan"))
    before = native.idle_memory()
    del out
    outs.clear()
    assert native.idle_memory() == before + count * B * H * N * D * 4


def test_keys_no_query_chose_get_zero_gradients_in_reused_buffers():
    ext = _kernel()
    q, k, v = (t.requires_grad_() for t in _inputs())
    pattern = make_request(q, k, v, pattern=TopK(2)).pattern  # this input's lists: most keys unchosen
    indices, valid = pattern.key_lists()
    chosen = torch.zeros(H, N, dtype=torch.bool)
    for h in range(H):
        chosen[h, indices[0, h][valid[0, h]]] = True
    assert (~chosen).sum() > N  # the test needs unchosen keys
    _dirty_pool(ext)
    grad = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(2))
    mh.attention(q, k, v, pattern=pattern, backend="blocksparse").backward(grad)
    for g in (k.grad, v.grad):
        assert torch.all(g[0][~chosen] == 0)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    naive_attention(*leaves, pattern=pattern).backward(grad.double())
    for got, want in zip((q.grad, k.grad, v.grad), leaves):
        assert max_error(got, want.grad) < 1e-4


EVICTION_CHECK = """
import torch
import multihead as mh
from multihead.backends import native
from multihead.patterns import SlidingWindow
MIB = 1 << 20
def output(n):  # a (1, 4, n, 64) float32 forward output: n / 1024 MiB
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    with torch.no_grad():
        return mh.attention(q, k, v, pattern=SlidingWindow(16, 16), backend="blocksparse")
idle = []
for n in (2048, 1024, 1536):
    out = output(n)
    del out
    idle.append(native.idle_memory() / MIB)
print(*idle)
"""


def test_past_the_limit_the_buffers_idle_longest_go_first():
    _kernel()
    done = _run(EVICTION_CHECK, {"MULTIHEAD_NATIVE_POOL_MIB": "3"})
    assert done.returncode == 0, done.stderr
    # 2 MiB kept; 1 MiB more fits; 1.5 MiB more does not: the 2 MiB buffer, idle longest, goes
    assert [float(x) for x in done.stdout.split()] == [2.0, 3.0, 2.5]


def test_empty_hands_out_kept_buffers_and_routing_permutes_into_them():
    _kernel()
    first = native.empty((B, H, N, D), torch.float32, "cpu")
    assert first.shape == (B, H, N, D) and first.dtype == torch.float32 and first.is_contiguous()
    where = first.data_ptr()
    del first
    assert native.empty((B, H, N, D), torch.float32, "cpu").data_ptr() == where  # the kept buffer again
    small = native.empty((3, 5), torch.bfloat16, torch.device("cpu"))
    assert small.shape == (3, 5) and small.dtype == torch.bfloat16
    # routing's permuted frame lands in kept buffers, and its values and gradients are right
    from multihead.request import _permute_tokens
    order = torch.stack([torch.randperm(N) for _ in range(B * H)]).view(B, H, N)
    x = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    got = _permute_tokens(x, order)
    want = x.gather(2, order.unsqueeze(-1).expand(B, H, N, D))
    assert torch.equal(got, want)
    grad = torch.randn_like(got)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])


def test_empty_without_the_kernel_is_torch_empty(monkeypatch):
    monkeypatch.setattr(native, "_loaded", lambda: None)
    t = native.empty((4, 6), torch.float16, "cpu")
    assert t.shape == (4, 6) and t.dtype == torch.float16


def _step_buffers(leaves, pattern, grad):
    """One training step; the data pointers of its output and of the leaves' gradients."""
    out = mh.attention(*leaves, pattern=pattern)
    out.backward(grad)
    where = {out.data_ptr()} | {t.grad.data_ptr() for t in leaves}
    for t in leaves:
        t.grad = None  # their buffers go back to the pool
    return where


def test_gradients_come_back_in_the_inputs_dtype_in_kept_buffers():
    _kernel()
    gen = torch.Generator().manual_seed(4)
    pattern = SlidingWindow(64, 64)
    # bf16 gradients of 1 MiB; and MQA's, whose one key head's accumulators are summed over parts
    for dtype, kv_heads, n in ((torch.bfloat16, H, N), (torch.float32, 1, 2 * N)):
        q = torch.randn(B, H, n, D, generator=gen).to(dtype).requires_grad_()
        k, v = (torch.randn(B, kv_heads, n, D, generator=gen).to(dtype).requires_grad_() for _ in range(2))
        grad = torch.randn(B, H, n, D, generator=gen).to(dtype)
        where = _step_buffers([q, k, v], pattern, grad)
        assert _step_buffers([q, k, v], pattern, grad) == where  # the same buffers serve the next step
        mh.attention(q, k, v, pattern=pattern).backward(grad)
        got = [t.grad for t in (q, k, v)]
        assert all(g.dtype == dtype for g in got)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        naive_attention(*leaves, pattern=pattern).backward(grad.double())
        for g, want in zip(got, leaves):
            assert max_error(g.double(), want.grad) < (3e-2 if dtype == torch.bfloat16 else 1e-4)


def test_runs_of_heads_are_joined_in_kept_buffers():
    """CrossShapedWindow on the ``heads`` backend: each run's output joined along the heads, and the
    runs' gradients joined back, in kept buffers; a batch of two takes each run's heads as a copy
    (not contiguous), also kept."""
    from multihead.patterns import CrossShapedWindow

    _kernel()
    batch, heads, grid = 2, 4, (32, 32)  # outputs of 2 MiB
    n = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(5)
    leaves = [torch.randn(batch, heads, n, D, generator=gen).requires_grad_() for _ in range(3)]
    grad = torch.randn(batch, heads, n, D, generator=gen)
    pattern = CrossShapedWindow(4, grid, heads)
    assert mh.explain(*leaves, pattern=pattern, show=False).backend == "heads"
    where = _step_buffers(leaves, pattern, grad)
    assert _step_buffers(leaves, pattern, grad) == where  # the joins' buffers again, not fresh ones
    out = mh.attention(*leaves, pattern=pattern)
    out.backward(grad)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    want = mh.attention(*ref, pattern=pattern, backend="reference")
    want.backward(grad.double())
    assert max_error(out.double(), want) < 1e-5
    for got, r in zip(leaves, ref):
        assert max_error(got.grad.double(), r.grad) < 1e-4


def test_joins_of_heads_stay_differentiable_twice():
    from multihead.backends.head_groups import _JoinHeads, _SplitHeads

    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        return _JoinHeads.apply(*(p * p for p in _SplitHeads.apply(x, [2, 3])))

    assert torch.equal(f(x), x * x)
    assert torch.autograd.gradgradcheck(f, (x,))


def test_contiguous_copies_into_a_kept_buffer_only_when_needed():
    _kernel()
    x = torch.randn(2, 2 * H, N, D)
    assert native.contiguous(x) is x
    part = x[:, H:]  # a run of heads of a batch of two: not contiguous
    copy = native.contiguous(part)
    assert copy.is_contiguous() and torch.equal(copy, part)
    where, size = copy.data_ptr(), copy.nbytes
    before = native.idle_memory()
    del copy
    assert native.idle_memory() >= before + size
    assert native.contiguous(part).data_ptr() == where
