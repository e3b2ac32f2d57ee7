"""Every topology under Causal, SlidingWindow and a 2-D Neighborhood, on every registered backend
that can serve it, equals the reference: forward and gradients (training requests), and forward
under ``torch.no_grad()`` (inference requests; backends that compile run only with ``-m slow``).

Backends are read from ``multihead.backends.BACKENDS`` at collection, so ones registered later are
picked up; a backend that cannot serve a request says so through ``unsupported`` and is skipped."""

from __future__ import annotations

import copy

import pytest
import torch

from multihead.backends import BACKENDS
from multihead.errors import BackendError
from multihead.heads import (CompressedAttention, GroupedQueryAttention, LowRankAttention, MixtureOfHeads,
                             MultiHeadLatentAttention, SingleHeadAttention, SparseQueryAttention,
                             TalkingHeadsAttention)
from multihead.patterns import Causal, Neighborhood, SlidingWindow

DIM, GRID = 16, (4, 4)
TOKENS = GRID[0] * GRID[1]
PATTERNS = {
    "causal": lambda: Causal(),
    "window": lambda: SlidingWindow(3, 2),
    "neighborhood2d": lambda: Neighborhood(3, grid=GRID),
}


def _talking(pattern):
    module = TalkingHeadsAttention(DIM, 4, 2, pattern=pattern)
    with torch.no_grad():  # mix for real, not the identity it starts from
        module.pre_mix.add_(0.3 * torch.randn(4, 4))
        module.post_mix.add_(0.3 * torch.randn(4, 4))
    return module


TOPOLOGIES = {
    "gqa": (lambda p: GroupedQueryAttention(DIM, 4, 2, pattern=p), {}),
    "moh": (lambda p: MixtureOfHeads(DIM, 4, shared_heads=1, top_k=2, pattern=p), {}),
    "sqa": (lambda p: SparseQueryAttention(DIM, 4, query_heads=2, kv_heads=1, pattern=p), {}),
    "mla_naive": (lambda p: MultiHeadLatentAttention(DIM, 4, q_rank=8, pattern=p), {"absorbed": False}),
    "mla_absorbed": (lambda p: MultiHeadLatentAttention(DIM, 4, q_rank=8, pattern=p), {"absorbed": True}),
    "cca": (lambda p: CompressedAttention(DIM, 2, compression=2, pattern=p), {}),
    "ccgqa": (lambda p: CompressedAttention(DIM, 4, 2, compression=2, pattern=p), {}),
    "low_rank": (lambda p: LowRankAttention(DIM, 4, rank=3, per_token=True, pattern=p), {}),
    "single_head": (lambda p: SingleHeadAttention(DIM, partial_dim=8, qk_dim=4, pattern=p), {}),
    "talking_heads": (_talking, {}),
}
OTHERS = [name for name in BACKENDS if name != "reference"]
INFERENCE = [pytest.param(name, marks=pytest.mark.slow) if getattr(BACKENDS[name], "compiles", False)
             else name for name in OTHERS]


def _build(topology, pattern_name, backend):
    build, kwargs = TOPOLOGIES[topology]
    torch.manual_seed(0)
    module = build(PATTERNS[pattern_name]())
    other = copy.deepcopy(module)
    other.backend = backend
    return module, other, kwargs


def _call(module, x, kwargs):
    try:
        return module(x, **kwargs)
    except BackendError as error:
        if "cannot serve this request" in str(error):
            pytest.skip(f"{module.backend}: {error}")
        raise


def _outputs_and_grads(module, x, dout, kwargs):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = _call(module, x, kwargs)
    out.backward(dout)
    return out.detach(), [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("backend", OTHERS)
@pytest.mark.parametrize("pattern_name", PATTERNS)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_training_matches_reference(topology, pattern_name, backend):
    module, other, kwargs = _build(topology, pattern_name, backend)
    x, dout = torch.randn(2, 2, TOKENS, DIM)
    got, got_grads = _outputs_and_grads(other, x, dout, kwargs)
    want, want_grads = _outputs_and_grads(module, x, dout, kwargs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", INFERENCE)
@pytest.mark.parametrize("pattern_name", PATTERNS)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_inference_matches_reference(topology, pattern_name, backend):
    module, other, kwargs = _build(topology, pattern_name, backend)
    x = torch.randn(2, TOKENS, DIM)
    with torch.no_grad():
        got = _call(other, x, kwargs)
        want = _call(module, x, kwargs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("topology", sorted(set(TOPOLOGIES) - {"talking_heads"}))
def test_a_fused_backend_serves_every_topology_but_talking_heads(topology):
    """The skips above are refusals, not a blanket: sdpa serves every topology except talking heads."""
    module, other, kwargs = _build(topology, "causal", "sdpa")
    other(torch.randn(2, TOKENS, DIM), **kwargs).sum().backward()


def test_talking_heads_run_on_auto_and_are_refused_by_name():
    module, other, _ = _build("talking_heads", "window", "sdpa")
    module.backend = "auto"
    module(torch.randn(2, TOKENS, DIM))
    with pytest.raises(BackendError, match="mixes the logits of all heads"):
        other(torch.randn(2, TOKENS, DIM))
