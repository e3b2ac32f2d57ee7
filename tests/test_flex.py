"""The ``flex`` backend: compiled FlexAttention with a block mask built from the analytic layout.

Compilation dominates the cost (on a 2-core machine about 10 s for the first kernel of a process
and 3-4 s for each further one; inductor's on-disk cache makes reruns fast). torch.compile builds a
kernel per pattern configuration, score, shape and dtype, so the default tests use four kernels and
share them; the wide matrix is marked ``slow``.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from multihead.backends.flex import (
    FlexBackend, block_mask_from_layout, cpu_compiler_problem,
    cpu_kernel_problem, flex_mask_mod)
from multihead.backends.reference import ReferenceBackend
from multihead.patterns import (
    Causal, CrossShapedWindow, Documents, Full, KeyPadding, Neighborhood, PrefixLM, SlidingWindow)
from multihead.request import make_request
from multihead.scores import ALiBi, RelativePositionBias, Softcap

from conftest import assert_within_tolerance, naive_attention

B, H, D = 2, 4, 16
BLOCK = 16  # small sparse blocks, so short sequences have empty, partial and full tiles
FLEX = FlexBackend(block_size=BLOCK)
REFERENCE = ReferenceBackend()


def _cpu_reason() -> str | None:
    q = torch.zeros(1, 1, 4, 8)
    return FLEX.unsupported(make_request(q, q, q))


needs_cpu_flex = pytest.mark.skipif(_cpu_reason() is not None,
                                    reason=f"flex cannot run on this CPU: it {_cpu_reason()}")


def _inputs(lq, lk, kv_heads, *, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, kv_heads, lk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, kv_heads, lk, D, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _check_forward(pattern, score, lq, lk, kv_heads, dtype=torch.float32, backend=FLEX):
    q, k, v = _inputs(lq, lk, kv_heads, dtype=dtype)
    with torch.no_grad():
        req = make_request(q, k, v, pattern=pattern, score=score)
        reason = backend.unsupported(req)
        assert reason is None, reason
        out, weights = backend.forward(req)
        truth, _ = REFERENCE.forward(make_request(q.double(), k.double(), v.double(), pattern=pattern,
                                                  score=score))
        baseline = naive_attention(q, k, v, pattern, score)
    assert weights is None and out.dtype == dtype and out.shape == (B, H, lq, D)
    assert_within_tolerance(out, truth, baseline, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=0)
    return out


# --------------------------------------------------------------------------------------------------
# The block mask from our layout equals create_block_mask's (no compilation)
# --------------------------------------------------------------------------------------------------

def _dense(num, idx, nk):
    slot = torch.arange(idx.shape[-1]) < num.unsqueeze(-1)
    target = torch.where(slot, idx.long(), torch.full_like(idx.long(), nk))
    dense = torch.zeros(*idx.shape[:-1], nk + 1, dtype=torch.bool)
    dense.scatter_(-1, target, True)
    return dense[..., :nk]


L = 37
LAYOUT_PATTERNS = {
    "full": (lambda: Full(), L, L),
    "causal_cross": (lambda: Causal(), 21, 53),
    "window": (lambda: SlidingWindow(5, 3), L, L),
    "window_or_prefix": (lambda: SlidingWindow(3, 0) | PrefixLM(20), L, L),
    "documents_causal": (lambda: Documents(torch.tensor([0, 10, 11, 30, L])) & Causal(), L, L),
    "padding_causal": (lambda: KeyPadding(torch.arange(L).expand(B, L) >= torch.tensor([[L], [25]]))
                       & Causal(), L, L),
    "neighborhood_2d": (lambda: Neighborhood((3, 5), (2, 1), (1, 2), (False, True), (7, 9)), 63, 63),
    "cswin": (lambda: CrossShapedWindow(2, (6, 8), H), 48, 48),
}


@pytest.mark.parametrize("blocks", [BLOCK, (16, 8)], ids=["16", "16x8"])
@pytest.mark.parametrize("name", LAYOUT_PATTERNS)
def test_block_mask_equals_create_block_mask(name, blocks):
    make, lq, lk = LAYOUT_PATTERNS[name]
    pattern = make()
    ours = block_mask_from_layout(pattern, lq, lk, blocks)
    theirs = create_block_mask(flex_mask_mod(pattern, lq, lk), pattern.batch_size, pattern.num_heads,
                               lq, lk, device="cpu", BLOCK_SIZE=blocks)
    assert ours.seq_lengths == theirs.seq_lengths == (lq, lk)
    assert ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    assert ours.kv_indices.shape == theirs.kv_indices.shape  # full width: every key block
    nk = ours.kv_indices.shape[-1]
    for attr in ("kv", "full_kv"):
        num_o, idx_o = getattr(ours, f"{attr}_num_blocks"), getattr(ours, f"{attr}_indices")
        num_t, idx_t = getattr(theirs, f"{attr}_num_blocks"), getattr(theirs, f"{attr}_indices")
        assert torch.equal(num_o, num_t), attr
        assert torch.equal(_dense(num_o, idx_o, nk), _dense(num_t, idx_t, nk)), attr
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    # the transposed (backward) layout agrees too
    assert torch.equal(ours.q_num_blocks, theirs.q_num_blocks)
    assert torch.equal(ours.full_q_num_blocks, theirs.full_q_num_blocks)


def test_block_masks_are_cached_per_pattern_lengths_and_block_size():
    backend = FlexBackend(block_size=BLOCK, cache_size=2)
    first = backend.block_mask(SlidingWindow(4, 4), 40, 40, "cpu")
    again = backend.block_mask(SlidingWindow(4, 4), 40, 40, "cpu")  # equal pattern value
    assert again.kv_indices is first.kv_indices and backend.cache_hits == 1
    assert backend.block_mask(SlidingWindow(4, 4), 39, 40, "cpu").kv_indices is not first.kv_indices
    backend.block_mask(Causal(), 40, 40, "cpu")  # evicts the least recently used entry
    assert backend.block_mask(SlidingWindow(4, 4), 40, 40, "cpu").kv_indices is not first.kv_indices
    assert len(backend._block_masks) == 2


def test_identity_patterns_are_cached_only_while_they_live():
    import gc

    backend = FlexBackend(block_size=BLOCK)
    documents = Documents(torch.tensor([0, 10, 40]))
    first = backend.block_mask(documents, 40, 40, "cpu")
    assert backend.block_mask(documents, 40, 40, "cpu").kv_indices is first.kv_indices
    assert backend.block_mask(Documents(torch.tensor([0, 10, 40])), 40, 40, "cpu").kv_indices \
        is not first.kv_indices  # another object: compared by identity
    gc.collect()
    assert len(backend._block_masks) == 1  # the temporary one is gone with its pattern
    del documents, first
    gc.collect()
    assert not backend._block_masks


def test_compiled_calls_are_shared_by_pattern_structure():
    backend = FlexBackend(block_size=BLOCK)
    docs = backend.compiled_call(Documents(torch.tensor([0, 10, 40])) & Causal())
    assert backend.compiled_call(Documents(torch.tensor([0, 5, 9, 40])) & Causal()) is docs
    assert backend.compiled_call(Documents(torch.tensor([0, 5, 9, 40]))) is not docs
    window = backend.compiled_call(SlidingWindow(4, 4))
    assert backend.compiled_call(SlidingWindow(4, 4)) is window
    assert backend.compiled_call(SlidingWindow(3, 4)) is not window


# --------------------------------------------------------------------------------------------------
# What it refuses, and why
# --------------------------------------------------------------------------------------------------

def _request(**kwargs):
    dtype = kwargs.pop("dtype", torch.float32)
    q = torch.randn(1, 2, 8, 8, dtype=dtype, requires_grad=kwargs.pop("grad", False))
    return make_request(q, q, q, **kwargs)


def test_unsupported_names_the_reason_and_the_alternative():
    assert "weights" in FLEX.unsupported(_request(return_weights=True))
    assert "dropout" in FLEX.unsupported(_request(dropout=0.1))
    assert "float64" in FLEX.unsupported(_request(dtype=torch.float64))
    why = FLEX.unsupported(_request(grad=True))
    assert "forward only on CPU" in why and "blocksparse" in why
    # a learnable score needs backward too, even when q, k, v do not require grad
    q = torch.randn(1, 2, 8, 8)
    why = FLEX.unsupported(make_request(q, q, q, score=RelativePositionBias(2, 8, 20)))
    assert why is not None and "forward only on CPU" in why


def test_no_grad_is_enough_on_cpu():
    with torch.no_grad():
        req = _request(grad=True, score=RelativePositionBias(2, 8, 20))
        assert not req.needs_grad
        assert FLEX.unsupported(req) == _cpu_reason()


def test_unsupported_without_a_cpp_compiler():
    if cpu_kernel_problem() is not None:
        pytest.skip(cpu_kernel_problem())
    from torch._inductor import config

    # config.patch, not monkeypatch: monkeypatch would delete the attribute when restoring it
    with config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
        assert "no-such-c++-compiler" in cpu_compiler_problem()
        why = FLEX.unsupported(_request())
    assert "C++ compiler" in why and "blocksparse" in why
    assert FLEX.unsupported(_request()) == _cpu_reason()


# --------------------------------------------------------------------------------------------------
# Compiled CPU forward against the reference: four kernels by default
# --------------------------------------------------------------------------------------------------

DEFAULT_CASES = {
    # pattern, score, q_len, kv_len, kv_heads
    "window_alibi_gqa_cross": (lambda: SlidingWindow(5, 3), lambda: ALiBi(H), 24, 48, 2),
    "documents_causal_t5_softcap": (lambda: Documents(torch.tensor([0, 10, 11, 30, 48])) & Causal(),
                                    lambda: [RelativePositionBias(H, 8, 20), Softcap(5.0)], 48, 48, H),
    "neighborhood_2d": (lambda: Neighborhood((3, 5), (2, 1), (1, 2), (False, True), (6, 8)),
                        lambda: None, 48, 48, H),
    "cswin_softcap_mqa": (lambda: CrossShapedWindow(2, (6, 8), H), lambda: Softcap(5.0), 48, 48, 1),
}


@needs_cpu_flex
@pytest.mark.parametrize("name", DEFAULT_CASES)
def test_compiled_forward_matches_reference(name):
    pattern, score, lq, lk, kv_heads = DEFAULT_CASES[name]
    _check_forward(pattern(), score(), lq, lk, kv_heads)


@needs_cpu_flex
def test_repeat_calls_reuse_the_mask_and_the_kernel():
    """Same pattern value and shapes: no new block mask, no recompilation; inputs requiring grad
    are fine under no_grad (FlexAttention itself rejects them on CPU even then)."""
    from torch._dynamo.utils import counters

    pattern, score, lq, lk, kv_heads = DEFAULT_CASES["window_alibi_gqa_cross"]
    backend = FlexBackend(block_size=BLOCK)
    _check_forward(pattern(), score(), lq, lk, kv_heads, backend=backend)
    graphs = counters["stats"]["unique_graphs"]
    q, k, v = _inputs(lq, lk, kv_heads, seed=5)
    with torch.no_grad():
        req = make_request(q.requires_grad_(), k, v, pattern=pattern(), score=score())
        out, _ = backend.forward(req)
    assert counters["stats"]["unique_graphs"] == graphs
    assert (backend.cache_hits, backend.cache_misses) == (1, 1)
    want, _ = REFERENCE.forward(make_request(q.detach(), k, v, pattern=pattern(), score=score()))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


@needs_cpu_flex
def test_dynamic_patterns_reuse_their_kernel_across_calls():
    """Routing resolves to a new pattern object on every call (new block mask), whose structure is
    the same: one compiled call, compiled once."""
    from torch._dynamo.utils import counters

    from multihead.patterns.dynamic import Routing

    backend = FlexBackend(block_size=BLOCK)
    graphs = None
    for seed in range(3):
        q, k, v = _inputs(48, 48, 2, seed=seed)
        with torch.no_grad():
            req = make_request(q, k, v, pattern=Routing(3) & Causal(), score=ALiBi(H))
            out, _ = req.restore(*backend.forward(req))
            want, _ = req.restore(*REFERENCE.forward(req))
        torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(backend._compiled) == 1 and backend.cache_misses == 3


def test_key_selections_are_refused_with_a_reason():
    from multihead.patterns.dynamic import TopK

    q, k, v = _inputs(48, 48, 2, seed=0)
    req = make_request(q, k, v, pattern=TopK(6) & Causal())
    assert "searches a list of keys per query" in FlexBackend().unsupported(req)


# --------------------------------------------------------------------------------------------------
# The wide matrix (slow): patterns x scores x (MHA, GQA), half precision, the recompile limit
# --------------------------------------------------------------------------------------------------

SLOW_PATTERNS = {
    # pattern, q_len, kv_len
    "full": (lambda: Full(), 24, 48),
    "causal": (lambda: Causal(), 24, 48),
    "window": (lambda: SlidingWindow(5, 3), 24, 48),
    "documents_causal": (lambda: Documents(torch.tensor([0, 10, 11, 30, 48])) & Causal(), 48, 48),
    "padding_causal": (lambda: KeyPadding(torch.arange(48).expand(B, 48) >= torch.tensor([[48], [25]]))
                       & Causal(), 24, 48),
    "neighborhood_2d": (lambda: Neighborhood((3, 5), (2, 1), (1, 2), (False, True), (6, 8)), 48, 48),
    "cswin": (lambda: CrossShapedWindow(2, (6, 8), H), 48, 48),
}
SLOW_SCORES = {
    "none": lambda: None,
    "alibi": lambda: ALiBi(H),
    "softcap": lambda: Softcap(5.0),
    "t5_bias": lambda: RelativePositionBias(H, num_buckets=8, max_distance=20),
}


@pytest.mark.slow
@needs_cpu_flex
@pytest.mark.parametrize("kv_heads", [H, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("score_name", SLOW_SCORES)
@pytest.mark.parametrize("pattern_name", SLOW_PATTERNS)
def test_compiled_forward_matrix(pattern_name, score_name, kv_heads):
    pattern, lq, lk = SLOW_PATTERNS[pattern_name]
    _check_forward(pattern(), SLOW_SCORES[score_name](), lq, lk, kv_heads)


@pytest.mark.slow
@needs_cpu_flex
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pattern_name", ["causal", "padding_causal", "cswin"])
def test_compiled_forward_half_precision(pattern_name, dtype):
    pattern, lq, lk = SLOW_PATTERNS[pattern_name]
    _check_forward(pattern(), ALiBi(H), lq, lk, 2, dtype=dtype)


@pytest.mark.slow
@needs_cpu_flex
def test_more_kernels_per_pattern_than_dynamos_recompile_limit_stay_compiled(caplog):
    """Each Softcap value is its own compiled entry of the pattern's compiled call; past dynamo's
    default limit (8) the next would fall back to the unfused eager path, which the backend
    prevents by raising the limit during its calls. Control: with the limit at 1 the second value
    falls back (still correct, but a warning says so)."""
    import torch._dynamo

    def fell_back():
        return [r for r in caplog.records if "recompile_limit" in r.getMessage()]

    caplog.set_level(logging.WARNING, logger="torch._dynamo")
    backend = FlexBackend(block_size=BLOCK)
    for cap in range(1, 11):
        _check_forward(SlidingWindow(3, 0), Softcap(float(cap)), 32, 32, H, backend=backend)
    assert backend.cache_misses == 1 and not fell_back()
    strict = FlexBackend(block_size=BLOCK, recompile_limit=1)
    with torch._dynamo.config.patch(recompile_limit=1):
        for cap in (1.0, 2.0):
            _check_forward(SlidingWindow(3, 0), Softcap(cap), 32, 32, H, backend=strict)
    assert fell_back()


# --------------------------------------------------------------------------------------------------
# CUDA: forward and backward (skipped without a GPU)
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pattern_name", ["causal", "documents_causal", "neighborhood_2d", "cswin"])
def test_cuda_forward_and_backward_match_reference(pattern_name):
    pattern, lq, lk = SLOW_PATTERNS[pattern_name]
    pattern = pattern()
    backend = FlexBackend()  # FlexAttention's default 128 blocks, which its CUDA kernels expect
    score32 = RelativePositionBias(H, num_buckets=8, max_distance=20)
    score64 = copy.deepcopy(score32).double().cuda()
    score32 = score32.cuda()
    q, k, v = _inputs(lq, lk, 2, device="cuda")
    dout = torch.randn(B, H, lq, D, device="cuda")

    def run(fn, dtype, score):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, score)
        out.backward(dout.to(dtype))
        return [out.detach()] + [t.grad for t in leaves] + [score.table.grad]

    def flex(q, k, v, score):
        req = make_request(q, k, v, pattern=pattern, score=score)
        reason = backend.unsupported(req)
        if reason is not None:
            pytest.skip(f"flex {reason}")
        return backend.forward(req)[0]

    def reference(q, k, v, score):
        return REFERENCE.forward(make_request(q, k, v, pattern=pattern, score=score))[0]

    truth = run(reference, torch.float64, score64)
    got = run(flex, torch.float32, score32)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dtable"], got, truth):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-3, msg=name)


