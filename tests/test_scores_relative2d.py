"""The 2-D relative position biases: Swin's learned table and CrossFormer's dynamic position bias.

Their bias equals an explicit lookup by 2-D offset; every backend that serves scores gives the
reference's output, and the table (or the DPB's MLP) gets the reference's gradients; gradcheck in
float64; composed with neighborhood and shifted-window patterns.
"""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead.backends import BACKENDS
from multihead.errors import MultiheadError
from multihead.patterns import Full, Neighborhood, ShiftedWindow
from multihead.request import make_request
from multihead.scores import DynamicPositionBias, RelativePositionBias2d

GRID = (6, 5)
N = GRID[0] * GRID[1]
HEADS = 2
PATTERNS = {
    "full": lambda: Full(),
    "shifted_window": lambda: ShiftedWindow(3, 1, grid=GRID),
    "dilated_neighborhood": lambda: Neighborhood(3, dilation=(2, 1), grid=GRID),
}
BIASES = {
    "table": lambda dilation=1: RelativePositionBias2d(HEADS, 3, dilation=dilation),
    "dynamic": lambda dilation=1: DynamicPositionBias(HEADS, 3, dilation=dilation, hidden=8),
}


def randomized(bias):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bias.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return bias


def explicit_bias(bias, grid, dilation=(1, 1)):
    """``bias[h, i, j]`` for every pair of tokens of ``grid``, by a loop over the pairs."""
    table = bias.table()
    rows, cols = grid
    reach = [e - 1 for e in bias.extent]
    out = torch.zeros(HEADS, rows * cols, rows * cols, dtype=table.dtype)
    for i in range(rows * cols):
        for j in range(rows * cols):
            dy = (i // cols) // dilation[0] - (j // cols) // dilation[0]
            dx = (i % cols) // dilation[1] - (j % cols) // dilation[1]
            dy, dx = max(-reach[0], min(reach[0], dy)), max(-reach[1], min(reach[1], dx))
            out[:, i, j] = table[:, dy + reach[0], dx + reach[1]]
    return out


@pytest.mark.parametrize("kind", BIASES)
def test_bias_is_the_table_entry_of_the_2d_offset(kind):
    bias = randomized(BIASES[kind]((2, 1)))
    got = bias.on(GRID).dense_bias(1, HEADS, N, N, "cpu", torch.float32)[0]
    torch.testing.assert_close(got, explicit_bias(bias, GRID, (2, 1)))
    # the grid given at construction is the same as binding it
    same = BIASES[kind]((2, 1))
    same.load_state_dict(bias.state_dict())
    same.grid = GRID
    torch.testing.assert_close(same.dense_bias(1, HEADS, N, N, "cpu", torch.float32)[0], got)


def test_dynamic_position_bias_is_an_mlp_of_each_offset():
    bias = randomized(DynamicPositionBias(HEADS, (2, 3), hidden=8))
    table = bias.table()
    assert table.shape == (HEADS, 3, 5)
    for dy in range(-1, 2):
        for dx in range(-2, 3):
            want = bias.mlp(torch.tensor([[float(dy), float(dx)]]))[0]
            torch.testing.assert_close(table[:, dy + 1, dx + 2], want)


def _inputs(dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, HEADS, N, 8, generator=gen).to(dtype) for _ in range(3)]


#: Every backend that serves scores on these patterns (NATTEN serves no score; `documents` only
#: packed documents, tested in test_varlen.py; `heads` only per-head patterns, in
#: test_head_groups.py); those that compile run with `make test-slow`.
BACKENDS_WITH_SCORES = [pytest.param(n, marks=pytest.mark.slow) if BACKENDS[n].compiles else n
                        for n in BACKENDS if n not in ("reference", "natten", "documents", "heads")]


@pytest.mark.parametrize("backend", BACKENDS_WITH_SCORES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", BIASES)
def test_every_backend_serving_scores_matches_the_reference(kind, pattern, backend):
    dilation = (2, 1) if pattern == "dilated_neighborhood" else 1
    bias = randomized(BIASES[kind](dilation))
    q, k, v = _inputs()
    pat = PATTERNS[pattern]()
    trains = backend != "flex"  # FlexAttention has no backward on CPU
    with torch.set_grad_enabled(trains):
        score = bias.on(GRID)
        req = make_request(q, k, v, pattern=pat, score=score)
        assert BACKENDS[backend].unsupported(req) is None, BACKENDS[backend].unsupported(req)
        ours = mh.attention(q, k, v, pattern=pat, score=score, backend=backend)
        want = mh.attention(q, k, v, pattern=pat, score=bias.on(GRID), backend="reference")
    torch.testing.assert_close(ours, want, atol=2e-6, rtol=1e-5)
    if trains:
        grad = torch.randn_like(ours)
        params = list(bias.parameters())
        g_ours = torch.autograd.grad(ours, params, grad)
        g_want = torch.autograd.grad(want, params, grad)
        for a, b in zip(g_ours, g_want):
            assert b.abs().max() > 0
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "blocksparse"])
@pytest.mark.parametrize("kind", BIASES)
def test_gradcheck_float64(kind, backend):
    """The parameters' gradients (those of q, k, v are the backends' own tests)."""
    bias = randomized(DynamicPositionBias(HEADS, 2, hidden=3) if kind == "dynamic"
                      else RelativePositionBias2d(HEADS, 2)).double()
    grid = (3, 4)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, HEADS, 12, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    pattern = ShiftedWindow(2, 1, grid=grid)
    # gradcheck feeds the parameters as inputs: each becomes a plain tensor attribute
    slots = []
    for module in bias.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            slots.append((module, name, p.detach().clone().requires_grad_()))

    def fn(*values):
        for (module, name, _), value in zip(slots, values):
            setattr(module, name, value)
        return mh.attention(q, k, v, pattern=pattern, score=bias.on(grid), backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(t for _, _, t in slots), eps=1e-6, atol=1e-5)


def test_bias_without_grid_and_bad_arguments():
    with pytest.raises(MultiheadError, match=r"has no grid: build it with grid=\(H, W\)"):
        mh.attention(*_inputs(), score=RelativePositionBias2d(HEADS, 3))
    with pytest.raises(MultiheadError, match="extent must be an int >= 1"):
        RelativePositionBias2d(HEADS, 0)
    with pytest.raises(MultiheadError, match="built for 2 heads"):
        q = torch.randn(1, 3, N, 8)
        mh.attention(q, q, q, score=RelativePositionBias2d(HEADS, 3).on(GRID))
    with pytest.raises(MultiheadError, match="hidden must be a positive integer"):
        DynamicPositionBias(HEADS, 3, hidden=0)
