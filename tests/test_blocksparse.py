"""The block-sparse backend against the reference: every pattern x score x (MHA, GQA, MQA) x dtype,
forward and gradients (q, k, v and the relative-bias table), in both of its key-reading modes
(contiguous key windows and gathered key blocks); gradcheck in float64; dropout; no N x N buffer."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from multihead.backends import native
from multihead.backends.blocksparse import BlockSparseBackend
from multihead.backends.reference import ReferenceBackend
from multihead.patterns import Causal, Full, KeyPadding, PrefixLM, SlidingWindow
from multihead.request import make_request
from multihead.scores import ALiBi, RelativePositionBias, Score, ScoreChain, Softcap

from conftest import assert_within_tolerance, sequence_patterns

B, H, L, D = 2, 4, 37, 16

PATTERNS = {
    **sequence_patterns(L, B),
    # keys with holes: blocks in the middle are empty, so groups must gather
    "holes_causal": lambda: KeyPadding(((torch.arange(L) >= 12) & (torch.arange(L) < 26)).expand(B, L).clone())
    & Causal(),
}
SCORES = {
    "none": lambda: None,
    "alibi": lambda: ALiBi(H),
    "softcap": lambda: Softcap(5.0),
    "t5_bias": lambda: RelativePositionBias(H, num_buckets=8, max_distance=20),
}
TOPOLOGIES = {"mha": H, "gqa": 2, "mqa": 1}
# Blocks of 8 / 4 leave partial blocks at both ends of L=37; "gather" forces the gathering mode.
# Each runs on the PyTorch tiles (native=False) and on the native kernel (the default).
MODES = {
    "window": dict(q_block=8, kv_block=8, group_rows=16, native=False),
    "gather": dict(q_block=8, kv_block=4, group_rows=16, window_slack=-1, native=False),
    "native": dict(q_block=8, kv_block=8),
    "native_gather": dict(q_block=8, kv_block=4, window_slack=-1),
}


@pytest.fixture(autouse=True)
def _seeded():
    """Score tables are drawn from the global generator: the same draw whatever ran before."""
    torch.manual_seed(0)


def _function_of(mode: str) -> str:
    """The autograd Function that a mode's memory-saving backward runs."""
    native_on = MODES[mode].get("native", True) and native.kernel() is not None
    return "NativeBlockSparse" if native_on else "BlockSparseFunction"


def _params(score):
    return [] if score is None else list(score.parameters())


def _run(backend, q, k, v, dtype, pattern, score, dout, dropout=0.0):
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    params = _params(score)
    for p in params:
        p.grad = None
    out, _ = backend.forward(make_request(*leaves, pattern=pattern, score=score, dropout=dropout))
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves] + [p.grad.clone() for p in params]


def _check(got, want, base, dtype, names):
    for name, g, w, b in zip(names, got, want, base):
        assert_within_tolerance(g, w, b, dtype, name)


def _inputs(seed, q_len, kv_len, kv_heads):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, q_len, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, kv_heads, kv_len, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, kv_heads, kv_len, D, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, H, q_len, D, generator=gen, dtype=torch.float64)
    return q, k, v, dout


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("score_name", SCORES)
@pytest.mark.parametrize("pattern_name", PATTERNS)
def test_matches_reference(pattern_name, score_name, topology, dtype, mode):
    """Error against a float64 reference at most 3x the reference backend's own error in ``dtype``."""
    q, k, v, dout = _inputs(0, L, L, TOPOLOGIES[topology])
    pattern, score = PATTERNS[pattern_name](), SCORES[score_name]()
    ref = ReferenceBackend()
    truth = _run(ref, q, k, v, torch.float64, pattern, score, dout)
    base = _run(ref, q, k, v, dtype, pattern, score, dout)
    got = _run(BlockSparseBackend(**MODES[mode]), q, k, v, dtype, pattern, score, dout)
    assert got[0].dtype == dtype
    _check(got, truth, base, dtype, ["out", "dq", "dk", "dv", "dtable"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("score_name", ["none", "alibi", "softcap", "t5_bias"])
@pytest.mark.parametrize("pattern_name",
                         ["full", "causal", "window", "causal_window", "prefix", "window_or_prefix"])
def test_fewer_queries_than_keys(pattern_name, score_name, mode):
    """q_len < kv_len (queries aligned with the last keys), GQA, forward and gradients."""
    q, k, v, dout = _inputs(1, 11, 29, 2)
    pattern, score = PATTERNS[pattern_name](), SCORES[score_name]()
    truth = _run(ReferenceBackend(), q, k, v, torch.float64, pattern, score, dout)
    base = _run(ReferenceBackend(), q, k, v, torch.float32, pattern, score, dout)
    got = _run(BlockSparseBackend(**MODES[mode]), q, k, v, torch.float32, pattern, score, dout)
    _check(got, truth, base, torch.float32, ["out", "dq", "dk", "dv", "dtable"])


@pytest.mark.parametrize("config", [
    dict(),  # defaults (native)
    dict(native=False),  # defaults (PyTorch tiles)
    dict(q_block=5, kv_block=3, group_rows=7, native=False),  # odd sizes
    dict(q_block=5, kv_block=3),  # odd sizes, native
    dict(q_block=4, kv_block=4, group_rows=4, window_slack=float("inf"), native=False),  # one key slice
    dict(q_block=4, kv_block=4, group_rows=8, mask_cache_bytes=0, native=False),  # masks rebuilt every call
    dict(q_block=4, kv_block=8, group_rows=8, window_slack=-1, mask_cache_bytes=3000, native=False),
    dict(q_block=8, kv_block=8, backward="autograd"),
    dict(q_block=4, kv_block=4, window_slack=-1, backward="autograd"),
], ids=["default", "torch", "odd", "native_odd", "slices", "nocache", "boolcache", "autograd",
        "autograd_gather"])
@pytest.mark.parametrize("pattern_name",
                         ["window", "documents_ids", "padding_causal", "window_or_prefix", "holes_causal"])
def test_configurations_agree_in_float64(config, pattern_name):
    """Any block size, grouping, mask cache or backward mode computes the same function."""
    q, k, v, dout = _inputs(2, L, L, 2)
    pattern = PATTERNS[pattern_name]()
    score = ScoreChain([RelativePositionBias(H, num_buckets=8, max_distance=20).double(), Softcap(4.0)])
    want = _run(ReferenceBackend(), q, k, v, torch.float64, pattern, score, dout)
    backend = BlockSparseBackend(**config)
    for _ in range(2):  # the second call runs from the cached plan and masks
        got = _run(backend, q, k, v, torch.float64, pattern, score, dout)
        for name, g, w in zip(["out", "dq", "dk", "dv", "dtable"], got, want):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_value_dim_differs_from_key_dim(mode):
    gen = torch.Generator().manual_seed(9)
    q, k, v, dout = (torch.randn(B, heads, L, dim, generator=gen, dtype=torch.float64)
                     for heads, dim in ((H, D), (2, D), (2, 5), (H, 5)))
    pattern, score = PATTERNS["window_or_prefix"](), SCORES["t5_bias"]().double()
    want = _run(ReferenceBackend(), q, k, v, torch.float64, pattern, score, dout)
    got = _run(BlockSparseBackend(**MODES[mode]), q, k, v, torch.float64, pattern, score, dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


def test_per_head_pattern_with_gqa():
    """A pattern that differs per head: gathered keys per query head, scattered back to kv heads."""
    per_head = pytest.importorskip("multihead.patterns.per_head")
    pattern = per_head.PerHead((SlidingWindow(2, 2), Causal(), SlidingWindow(3, 0) | PrefixLM(5), Full()))
    q, k, v, dout = _inputs(3, L, L, 2)
    want = _run(ReferenceBackend(), q, k, v, torch.float64, pattern, ALiBi(H), dout)
    for config in MODES.values():
        got = _run(BlockSparseBackend(**config), q, k, v, torch.float64, pattern, ALiBi(H), dout)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


GRAD_PATTERNS = ["causal", "window", "documents_cu", "padding_causal", "window_or_prefix", "holes_causal"]


def _gradcheck_inputs(pattern, q_len, heads=2):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(B, heads, q_len, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, 1, L, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, 1, L, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = RelativePositionBias(heads, num_buckets=8, max_distance=20).double()
    table = bias.table.detach().clone().requires_grad_()
    del bias.table  # fed as a plain tensor attribute, not a Parameter
    return q, k, v, bias, table


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern_name", GRAD_PATTERNS)
def test_gradcheck_float64(pattern_name, mode):
    """q, k, v (GQA) and a relative-bias table given as a plain tensor attribute. Fast mode (a
    random projection of the Jacobian) for every pattern; the full Jacobian in the next test."""
    pattern = PATTERNS[pattern_name]()
    q, k, v, bias, table = _gradcheck_inputs(pattern, L)
    backend = BlockSparseBackend(**MODES[mode])

    def fn(q, k, v, table):
        bias.table = table
        return backend.forward(make_request(q, k, v, pattern=pattern, score=bias))[0]

    # the table is found, so the memory-saving Function runs (not the plain-autograd fallback)
    assert _function_of(mode) in type(fn(q, k, v, table).grad_fn).__name__
    assert torch.autograd.gradcheck(fn, (q, k, v, table), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_full_jacobian(mode):
    """The whole Jacobian, on a short query range (q_len < kv_len) under a union pattern."""
    pattern = SlidingWindow(3, 1) | PrefixLM(4)
    q, k, v, bias, table = _gradcheck_inputs(pattern, 9)
    backend = BlockSparseBackend(**MODES[mode])

    def fn(q, k, v, table):
        bias.table = table
        return backend.forward(make_request(q, k, v, pattern=pattern, score=bias))[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, table), eps=1e-6, atol=1e-5)


def test_gradcheck_softcap_and_dropout():
    """Softcap's derivative; and dropout: with the seed fixed per call the function is
    deterministic, and backward must regenerate exactly the forward's mask."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 19, 3, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    backend = BlockSparseBackend(q_block=4, kv_block=4, group_rows=8)

    def fn(q, k, v):
        torch.manual_seed(0)
        return backend.forward(make_request(q, k, v, pattern=SlidingWindow(6, 2), score=Softcap(2.0),
                                            dropout=0.3))[0]

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)


def test_double_backward_with_plain_autograd():
    """``backward="autograd"`` is differentiable twice (the default Function is not)."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 13, 3, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    backend = BlockSparseBackend(q_block=4, kv_block=4, group_rows=4, backward="autograd")

    def fn(q, k, v):
        return backend.forward(make_request(q, k, v, pattern=SlidingWindow(3, 1) | PrefixLM(2),
                                            score=Softcap(3.0)))[0]

    assert torch.autograd.gradgradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("use_native", [False, True], ids=["torch", "native"])
def test_plan_cache_is_bounded(use_native):
    backend = BlockSparseBackend(q_block=4, kv_block=4, plan_cache=3, native=use_native)
    q = torch.randn(1, 2, 20, 4)
    for window in range(1, 8):
        backend.forward(make_request(q, q, q, pattern=SlidingWindow(window, window)))
    assert len(backend._plans) == 3
    if use_native:  # a tile table counts against mask_cache_bytes: only the newest plan is kept
        backend = BlockSparseBackend(q_block=4, kv_block=4, mask_cache_bytes=1)
        for window in range(1, 4):
            backend.forward(make_request(q, q, q, pattern=SlidingWindow(window, window)))
        assert len(backend._plans) == 1
        return
    backend = BlockSparseBackend(q_block=4, kv_block=4, mask_cache_bytes=1, native=False)  # masks never kept
    for window in range(1, 4):
        backend.forward(make_request(q, q, q, pattern=SlidingWindow(window, window)))
    assert all(p.mask_bytes == 0 for p in backend._plans.values())


def test_score_with_an_outside_tensor_falls_back_to_autograd():
    """A score closing over a tensor that requires grad (not a leaf attribute): still trains."""
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    class Scaled(Score):
        additive = False

        def forward(self, s, b, h, q_idx, kv_idx):
            return s * scale

    q, k, v, dout = _inputs(5, L, L, 4)
    grads = []
    for backend in (ReferenceBackend(), BlockSparseBackend(q_block=8, kv_block=8)):
        scale.grad = None
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = backend.forward(make_request(*leaves, pattern=SlidingWindow(4, 4), score=Scaled()))
        assert "BlockSparseFunction" not in type(out.grad_fn).__name__
        out.backward(dout)
        grads.append([out] + [t.grad for t in leaves] + [scale.grad.clone()])
    for g, w in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, w)


def test_dropout_statistics_and_reproducibility():
    torch.manual_seed(0)
    q, k = (torch.randn(1, 2, 300, 8) for _ in range(2))
    v = torch.ones(1, 2, 300, 1)
    backend = BlockSparseBackend()
    plain, _ = backend.forward(make_request(q, k, v, pattern=SlidingWindow(20, 20)))
    torch.testing.assert_close(plain, torch.ones_like(plain))
    torch.manual_seed(1)
    a, _ = backend.forward(make_request(q, k, v, pattern=SlidingWindow(20, 20), dropout=0.4))
    torch.manual_seed(1)
    b, _ = backend.forward(make_request(q, k, v, pattern=SlidingWindow(20, 20), dropout=0.4))
    assert a.isfinite().all() and torch.equal(a, b)
    # with v = 1 each output is sum_j P_ij keep_ij / (1 - p): mean 1, and not identically 1
    assert not torch.allclose(a, plain)
    assert abs(a.mean().item() - 1.0) < 0.03
    # every output is a sum of kept weights scaled by 1 / (1 - p): at most 1 / 0.6
    assert (a >= 0).all() and (a <= 1 / 0.6 + 1e-5).all()


def test_dropout_same_mask_in_both_backward_modes():
    """The PyTorch tiles' recompute Function and plain autograd draw the same masks from the same
    seed (the native kernel has a mask of its own: ``test_native``)."""
    q, k, v, dout = _inputs(6, L, L, 2)
    results = []
    for backward in ("recompute", "autograd"):
        torch.manual_seed(3)
        results.append(_run(BlockSparseBackend(q_block=8, kv_block=8, backward=backward, native=False), q, k, v,
                            torch.float64, SlidingWindow(5, 3), ALiBi(H), dout, dropout=0.5))
    for g, w in zip(*results):
        torch.testing.assert_close(g, w)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("use_native", [False, True], ids=["torch", "native"])
@pytest.mark.parametrize("score", [None, RelativePositionBias(2, num_buckets=8, max_distance=20)],
                         ids=["none", "t5_bias"])
def test_no_n_by_n_buffer(score, use_native):
    """Forward and backward allocate nothing of size N x N: every tensor any op produces is
    linear in N (PyTorch tiles: at most q's size; native: the tile table's mask, N x its width,
    and the per-partition key gradients), whatever the window."""
    window, largest = 16, []
    for n in (2048, 4096):
        q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
        backend = BlockSparseBackend(native=use_native)
        with _LargestTensor() as mode:
            out, _ = backend.forward(make_request(q, k, v, pattern=SlidingWindow(window, window), score=score))
            out.sum().backward()
        assert q.grad.isfinite().all() and k.grad.isfinite().all()
        assert mode.largest < n * n / 16
        if not use_native:
            assert mode.largest <= q.numel()
        largest.append(mode.largest)
    assert largest[1] <= 2.05 * largest[0]  # linear in N


def test_unsupported_only_for_weights():
    q = torch.randn(1, 2, 8, 4)
    assert BlockSparseBackend().unsupported(make_request(q, q, q)) is None
    assert "reference" in BlockSparseBackend().unsupported(make_request(q, q, q, return_weights=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    q, k, v, dout = _inputs(7, L, L, 2)
    pattern = SlidingWindow(5, 3) | PrefixLM(4)
    score = RelativePositionBias(H, num_buckets=8, max_distance=20)
    cpu = _run(BlockSparseBackend(q_block=8, kv_block=4, window_slack=-1), q, k, v, torch.float32,
               pattern, score, dout)
    score.cuda()
    gpu = _run(BlockSparseBackend(q_block=8, kv_block=4, window_slack=-1), q.cuda(), k.cuda(), v.cuda(),
               torch.float32, pattern, score, dout.cuda())
    for g, c in zip(gpu, cpu):
        torch.testing.assert_close(g.cpu(), c, atol=1e-4, rtol=1e-4)


def test_score_parameters_train_under_functional_call():
    """``torch.func.functional_call`` swaps parameters in for the call and back on return, before
    backward runs; backward must still differentiate the score's swapped-in table."""
    from multihead.nn import MultiHeadAttention

    torch.manual_seed(0)
    module = MultiHeadAttention(16, 2, score=RelativePositionBias(2), pattern=Causal())
    grads = []
    for backend in ("reference", "blocksparse"):
        module.backend = backend
        params = {name: p.detach().clone().requires_grad_() for name, p in module.named_parameters()}
        x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
        torch.func.functional_call(module, params, (x,)).square().sum().backward()
        grads.append(params["score.table"].grad)
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])
