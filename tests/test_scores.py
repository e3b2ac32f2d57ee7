"""Score modifiers and positions: the papers' definitions, and training through them."""

from __future__ import annotations

import math

import pytest
import torch

import multihead as mh
from multihead.patterns import Causal
from multihead.scores import ALiBi, RelativePositionBias, RoPE, Softcap, alibi_slopes, relative_position_bucket


def test_alibi_slopes_power_of_two_are_the_geometric_sequence():
    assert alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]


def test_alibi_slopes_other_head_counts_follow_the_paper_recipe():
    # 6 heads: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then every other 8-head slope: 2^-1, 2^-3.
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert len(alibi_slopes(12)) == 12 and len(set(alibi_slopes(12).tolist())) == 12


def test_alibi_under_causal_is_minus_slope_times_distance():
    alibi = ALiBi(2)
    logits = torch.zeros(1, 2, 4, 4)
    biased = alibi.apply_dense(logits, 4)
    i, j = torch.arange(4)[:, None], torch.arange(4)[None, :]
    for h, slope in enumerate(alibi_slopes(2).tolist()):
        expected = -slope * (i - j).abs().float()
        torch.testing.assert_close(biased[0, h], expected)


def test_softcap_bounds_logits():
    cap = Softcap(2.0)
    x = torch.tensor([-100.0, -1.0, 0.0, 1.0, 100.0])
    y = cap(x, None, None, None, None)
    assert y.abs().max() <= 2.0
    torch.testing.assert_close(y, 2.0 * torch.tanh(x / 2.0))


@pytest.mark.parametrize("rp, bidirectional, expected", [
    (0, True, 0), (-1, True, 1), (1, True, 17), (-7, True, 7), (-8, True, 8), (-200, True, 15), (200, True, 31),
    (5, False, 0), (-1, False, 1), (-15, False, 15), (-16, False, 16), (-1000, False, 31),
])
def test_t5_buckets(rp, bidirectional, expected):
    bucket = relative_position_bucket(torch.tensor(rp), bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert bucket.item() == expected


def test_t5_buckets_are_monotone_in_distance():
    distance = torch.arange(0, 500)
    buckets = relative_position_bucket(-distance, bidirectional=False, num_buckets=32, max_distance=128)
    assert (buckets.diff() >= 0).all() and buckets[-1] == 31


def test_relative_bias_trains_until_a_target_pattern_is_learned():
    """Learn a bias that makes every query attend to the previous token, through the sdpa backend."""
    torch.manual_seed(0)
    n, heads = 16, 2
    bias = RelativePositionBias(heads, num_buckets=8, max_distance=16, bidirectional=False)
    opt = torch.optim.Adam(bias.parameters(), lr=0.1)
    v = torch.eye(n).expand(1, heads, n, n)
    target = torch.roll(torch.eye(n), -1, 1)  # row i selects key i-1
    target[0] = torch.eye(n)[0]
    q = k = torch.zeros(1, heads, n, 4)
    losses = []
    for _ in range(150):
        out = mh.attention(q, k, v, pattern=Causal(), score=bias, backend="sdpa")
        loss = (out - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def rope_pairwise(x, positions, base=10000.0, rotary_dim=None):
    """RoPE written from the paper: pairs (i, i + r/2) rotated as complex numbers."""
    rotary_dim = rotary_dim or x.shape[-1]
    half = rotary_dim // 2
    out = x.clone().double()
    for p_index, pos in enumerate(positions.tolist()):
        for i in range(half):
            theta = pos * base ** (-2 * i / rotary_dim)
            z = complex(x[..., p_index, i].item(), x[..., p_index, i + half].item()) * complex(math.cos(theta), math.sin(theta))
            out[..., p_index, i], out[..., p_index, i + half] = z.real, z.imag
    return out


def test_rope_matches_complex_rotation_and_partial_rotary_passes_through():
    x = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    rope = RoPE(8, rotary_dim=4, base=100.0)
    rotated, _ = rope(x, x)
    positions = torch.arange(5)
    torch.testing.assert_close(rotated, rope_pairwise(x, positions, base=100.0, rotary_dim=4).to(rotated.dtype), atol=1e-5, rtol=1e-5)
    assert torch.equal(rotated[..., 4:], x[..., 4:])


def test_rope_scores_depend_on_relative_position_only():
    rope = RoPE(16)
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 12, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 1, 12, 16)
    rq, rk = rope(q, k)
    scores = rq[0, 0] @ rk[0, 0].T
    for offset in range(-4, 5):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-4, rtol=1e-4)


def test_rope_aligns_queries_with_last_keys():
    rope = RoPE(8)
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 6, 8)
    rq, _ = rope(q, k)
    torch.testing.assert_close(rq, rope.rotate(q, torch.tensor([4, 5])))
