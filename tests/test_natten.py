"""The ``natten`` backend, and NATTEN as an independent check of ``Neighborhood``'s semantics.

NATTEN is an optional extra (``pip install --no-build-isolation natten==0.21.7``); the tests that
need it skip cleanly when it is missing. On CPU NATTEN runs through uncompiled FlexAttention with
its own mask (``get_na_flex_mask``), written independently of ours.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from multihead.backends import natten as natten_backend
from multihead.backends.natten import NattenBackend
from multihead.backends.reference import ReferenceBackend
from multihead.patterns import Causal, Neighborhood
from multihead.request import make_request
from multihead.scores import ALiBi

from conftest import assert_within_tolerance, naive_attention

NATTEN = NattenBackend()
REFERENCE = ReferenceBackend()

# What torch says about how NATTEN calls FlexAttention (uncompiled on CPU, return_lse) is not ours.
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated")]


@pytest.fixture(scope="module")
def natten():
    return pytest.importorskip("natten")


def test_missing_natten_names_the_install_command(monkeypatch):
    monkeypatch.setattr(natten_backend, "_load", lambda: (None, "ModuleNotFoundError: no natten"))
    q = torch.randn(1, 1, 9, 8)
    why = NATTEN.unsupported(make_request(q, q, q, pattern=Neighborhood(3, grid=9)))
    assert "pip install --no-build-isolation natten==0.21.7" in why and "after torch" in why


# --------------------------------------------------------------------------------------------------
# NATTEN's output equals the reference on the same Neighborhood
# --------------------------------------------------------------------------------------------------

CASES = {
    # grid, kernel, dilation, stride, causal, kv_heads
    "1d": ((20,), 5, 1, 1, False, 4),
    "1d_dilated": ((23,), 5, 4, 1, False, 4),
    "1d_strided_even_stride": ((20,), 5, 1, 4, False, 2),
    "1d_causal_strided_dilated": ((22,), 4, 2, 3, True, 4),
    "1d_full_kernel": ((21,), 21, 1, 1, False, 4),
    "2d": ((7, 9), (3, 5), 1, 1, False, 4),
    "2d_mixed": ((9, 11), (3, 4), (2, 2), (2, 3), (False, True), 2),
    "2d_causal_rows_full_cols": ((5, 7), (5, 7), 1, 1, (True, False), 1),
    "3d": ((4, 5, 6), (3, 3, 3), 1, 1, False, 4),
    "3d_mixed": ((5, 6, 7), (3, 2, 5), (1, 2, 1), (3, 1, 2), (False, True, False), 2),
    "3d_causal_time": ((6, 4, 5), (2, 3, 3), (2, 1, 1), (2, 1, 3), (True, False, False), 4),
}


def _inputs(n, kv_heads, *, heads=4, dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(2, kv_heads, n, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(2, kv_heads, n, dim, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)]


@pytest.mark.parametrize("name", CASES)
def test_natten_matches_reference(natten, name):
    grid, kernel, dilation, stride, causal, kv_heads = CASES[name]
    pattern = Neighborhood(kernel, dilation, stride, causal, grid)
    q, k, v = _inputs(math.prod(grid), kv_heads)
    with torch.no_grad():
        req = make_request(q, k, v, pattern=pattern)
        assert NATTEN.unsupported(req) is None, NATTEN.unsupported(req)
        out, weights = NATTEN.forward(req)
        truth, _ = REFERENCE.forward(make_request(q.double(), k.double(), v.double(), pattern=pattern))
    assert weights is None and out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=0)
    # not vacuous: the neighborhood differs from full attention
    if pattern.density(q.shape[2], q.shape[2]) < 1:
        full, _ = REFERENCE.forward(make_request(q.double(), k.double(), v.double()))
        assert (full - truth).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_natten_half_precision(natten, dtype):
    grid, kernel, dilation, stride, causal, kv_heads = CASES["2d_mixed"]
    pattern = Neighborhood(kernel, dilation, stride, causal, grid)
    q, k, v = _inputs(math.prod(grid), kv_heads, dtype=dtype)
    with torch.no_grad():
        out, _ = NATTEN.forward(make_request(q, k, v, pattern=pattern))
        truth, _ = REFERENCE.forward(make_request(q.double(), k.double(), v.double(), pattern=pattern))
    assert out.dtype == dtype
    assert_within_tolerance(out, truth, naive_attention(q, k, v, pattern), dtype)


def test_natten_with_inputs_requiring_grad_under_no_grad(natten):
    pattern = Neighborhood(3, grid=(4, 4))
    q, k, v = (t.requires_grad_() for t in _inputs(16, 4))
    assert "forward only on CPU" in NATTEN.unsupported(make_request(q, k, v, pattern=pattern))
    with torch.no_grad():
        out, _ = NATTEN.forward(make_request(q, k, v, pattern=pattern))
        want, _ = REFERENCE.forward(make_request(q, k, v, pattern=pattern))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# The mask itself, read off NATTEN's output, on random configurations
# --------------------------------------------------------------------------------------------------

def natten_mask(natten, grid, kernel, dilation, stride, causal):
    """NATTEN's mask ``(N, N)``: with q = k = 0 every allowed key gets the same weight, and one-hot
    values make output row i the weights of query i (head_dim padded to NATTEN's power of two)."""
    n = math.prod(grid)
    width = max(8, 1 << (n - 1).bit_length())
    v = torch.nn.functional.pad(torch.eye(n), (0, width - n)).reshape(1, *grid, 1, width)
    q = torch.zeros(1, *grid, 1, width)
    na = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(grid)]
    out = na(q, q, v, kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    return out.reshape(n, width)[:, :n] > 0


def random_configs(count, seed, *, even_kernels=False):
    """Random (grid, kernel, dilation, stride, causal) valid for NATTEN (kernel >= 2, at most 512
    tokens); with ``even_kernels`` only those with an even kernel on a non-causal axis."""
    rng = random.Random(seed)
    sizes = {1: 40, 2: 12, 3: 8}
    configs = []
    while len(configs) < count:
        ndim = rng.choice([1, 2, 3])
        grid = tuple(rng.randint(2, sizes[ndim]) for _ in range(ndim))
        causal = tuple(rng.random() < 0.4 for _ in range(ndim))
        kernel = []
        for n, c in zip(grid, causal):
            choices = [k for k in range(2, n + 1) if c or even_kernels or k % 2]
            kernel.append(rng.choice(choices) if choices else None)
        if None in kernel:
            continue
        if even_kernels and not any(k % 2 == 0 and not c for k, c in zip(kernel, causal)):
            continue
        if ndim == 1 and causal[0] and kernel[0] == grid[0]:
            continue  # plain causal attention: NATTEN needs libnatten for it
        dilation = tuple(rng.randint(1, n // k) for n, k in zip(grid, kernel))
        stride = tuple(rng.randint(1, k) for k in kernel)
        configs.append((grid, tuple(kernel), dilation, stride, causal))
    return configs


def _check_masks(natten, configs):
    mismatches = []
    for grid, kernel, dilation, stride, causal in configs:
        pattern = Neighborhood(kernel, dilation, stride, causal, grid)
        n = math.prod(grid)
        ours = pattern.dense_mask(n, n)[0, 0]
        if not torch.equal(ours, natten_mask(natten, grid, kernel, dilation, stride, causal)):
            mismatches.append(pattern)
    assert not mismatches, f"{len(mismatches)} of {len(configs)} disagree with NATTEN: {mismatches[:5]}"


def test_neighborhood_mask_equals_natten_on_random_configurations(natten):
    _check_masks(natten, random_configs(60, seed=0))


@pytest.mark.slow
def test_neighborhood_mask_equals_natten_on_many_random_configurations(natten):
    _check_masks(natten, random_configs(500, seed=1))


def test_even_noncausal_kernels_follow_natten(natten):
    """NATTEN 0.21.7 accepts even kernels on non-causal axes (window ``[c - k/2, c + k/2 - 1]``,
    ``c`` clamped into the axis); so does ``Neighborhood``, with the same masks."""
    for grid, kernel, dilation, stride, causal in random_configs(40, seed=2, even_kernels=True):
        pattern = Neighborhood(kernel, dilation=dilation, stride=stride, causal=causal, grid=grid)
        n = math.prod(grid)
        assert torch.equal(pattern.dense_mask(n, n)[0, 0],
                           natten_mask(natten, grid, kernel, dilation, stride, causal)), pattern


# --------------------------------------------------------------------------------------------------
# What it refuses, and why
# --------------------------------------------------------------------------------------------------

def test_unsupported_names_the_reason(natten):
    q = torch.randn(2, 4, 20, 16)
    nbhd = Neighborhood(5, grid=20)

    def why(q=q, **kwargs):
        return NATTEN.unsupported(make_request(q, q, q, **kwargs))

    assert "only Neighborhood" in why(pattern=Causal())
    assert "only Neighborhood" in why(pattern=nbhd & Causal())
    assert "score" in why(pattern=nbhd, score=ALiBi(4))
    assert "dropout" in why(pattern=nbhd, dropout=0.1)
    assert "weights" in why(pattern=nbhd, return_weights=True)
    assert "float64" in why(q=q.double(), pattern=nbhd)
    assert "at least 2" in why(pattern=Neighborhood(1, grid=20))
    assert "forward only on CPU" in why(q=q.clone().requires_grad_(), pattern=nbhd)
    assert "head_dim" in why(q=torch.randn(2, 4, 20, 20), pattern=nbhd)
    if not getattr(natten, "HAS_LIBNATTEN", False):
        assert "libnatten" in why(pattern=Neighborhood(20, causal=True, grid=20))
    assert why(pattern=nbhd) is None
