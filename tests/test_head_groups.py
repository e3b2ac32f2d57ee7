"""Patterns that differ per head, split into runs of heads (``Pattern.head_groups``) and run a run at
a time by the ``heads`` backend: the runs are exact, and the split computes the reference's
function, forward and gradients (q, k, v and a learnable score), under GQA too."""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead.backends import BACKENDS
from multihead.normalizers import GaussianAdaptive
from multihead.patterns import (BlockLocal, Causal, CrossShapedWindow, Full, GlobalTokens, KeyPadding,
                                PerHead, SlidingWindow)
from multihead.request import make_request
from multihead.scores import ALiBi, RelativePositionBias

B, H, D = 2, 4, 8
GRID = (6, 8)
N = GRID[0] * GRID[1]
PADDING = torch.arange(N).expand(B, N) >= torch.tensor([[N], [N - 9]])

PATTERNS = {
    "cswin": lambda: CrossShapedWindow(2, GRID, H),
    "cswin_odd_stripe": lambda: CrossShapedWindow(5, GRID, H),  # 5 divides neither side
    "cswin_and_causal": lambda: CrossShapedWindow(2, GRID, H) & Causal(),
    "cswin_and_padding": lambda: CrossShapedWindow(3, GRID, H) & KeyPadding(PADDING),
    "per_head_window_full": lambda: PerHead((SlidingWindow(3, 3), SlidingWindow(3, 3), Full(), Full())),
    "per_head_or_global": lambda: PerHead((Causal(), Causal(), SlidingWindow(5, 0), SlidingWindow(5, 0)))
    | GlobalTokens(2),
}


@pytest.mark.parametrize("name", PATTERNS)
def test_runs_cover_the_heads_and_equal_their_slice_of_the_pattern(name):
    pattern = PATTERNS[name]()
    runs = pattern.head_groups()
    assert runs[0][0] == 0 and runs[-1][1] == H
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:])) and len(runs) >= 2
    whole = pattern.dense_mask(N, N).expand(B, H, N, N)
    for h0, h1, part in runs:
        assert part.num_heads is None
        torch.testing.assert_close(part.dense_mask(N, N).expand(B, h1 - h0, N, N), whole[:, h0:h1])


def test_per_head_merges_equal_neighbours_only():
    window = SlidingWindow(2, 2)
    pattern = PerHead((window, SlidingWindow(2, 2), Causal(), window))  # equal values merge
    assert [(h0, h1) for h0, h1, _ in pattern.head_groups()] == [(0, 2), (2, 3), (3, 4)]
    rows, cols = GRID
    stripes = CrossShapedWindow(2, GRID, 6).head_groups()
    assert stripes == [(0, 3, BlockLocal((2, cols), GRID)), (3, 6, BlockLocal((rows, 2), GRID))]
    assert Causal().head_groups() is None and (Causal() & SlidingWindow(3)).head_groups() is None


def _inputs(kv_heads, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, kv_heads, N, D, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("kv_heads", [H, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("score_name", ["none", "alibi", "t5_bias"])
@pytest.mark.parametrize("name", PATTERNS)
def test_heads_backend_equals_the_reference(name, score_name, kv_heads):
    """Forward and the gradients of q, k, v and of the relative-bias table, in float64."""
    pattern = PATTERNS[name]()
    score = {"none": None, "alibi": ALiBi(H),
             "t5_bias": RelativePositionBias(H, num_buckets=8, max_distance=20).double()}[score_name]
    params = [] if score is None else list(score.parameters())
    results = []
    for backend in ("heads", "reference"):
        leaves = [t.clone().requires_grad_() for t in _inputs(kv_heads)]
        out = mh.attention(*leaves, pattern=pattern, score=score, backend=backend)
        grads = torch.autograd.grad(out.square().sum(), leaves + params)
        results.append([out, *grads])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_auto_splits_per_head_patterns_on_cpu_and_says_why_not_otherwise():
    q, k, v = _inputs(H)
    cswin = CrossShapedWindow(2, GRID, H)
    explanation = mh.explain(q, k, v, pattern=cswin, show=False)
    assert explanation.backend == "heads" and "differs per head" in explanation.rule
    # runs of one head cannot keep GQA's pairs of query heads together: block-sparse serves them
    alternating = PerHead((Causal(), Full(), Causal(), Full()))
    gqa = _inputs(2)
    why = BACKENDS["heads"].unsupported(make_request(*gqa, pattern=alternating))
    assert "whole groups of query heads" in why
    assert mh.explain(*gqa, pattern=alternating, show=False).backend == "blocksparse"
    assert "serves patterns that differ per head" in BACKENDS["heads"].unsupported(
        make_request(q, k, v, pattern=Causal()))
    gaam = GaussianAdaptive(H).double()
    why = BACKENDS["heads"].unsupported(make_request(q, k, v, pattern=cswin, normalizer=gaam))
    assert "GaussianAdaptive" in why
    assert "weights" in BACKENDS["heads"].unsupported(make_request(q, k, v, pattern=cswin, return_weights=True))


def test_heads_backend_serves_sigmoid_and_dropout():
    q, k, v = _inputs(H)
    cswin = CrossShapedWindow(2, GRID, H)
    torch.testing.assert_close(mh.attention(q, k, v, pattern=cswin, normalizer="sigmoid", backend="heads"),
                               mh.attention(q, k, v, pattern=cswin, normalizer="sigmoid", backend="reference"))
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(mh.attention(q, k, v, pattern=cswin, dropout=0.5, backend="heads"))
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.allclose(runs[0], mh.attention(q, k, v, pattern=cswin, backend="heads"))
