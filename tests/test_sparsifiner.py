"""Sparsifiner against a direct transcription: the low-rank connectivity predictor, the binarised
top-k mask, the attention on it (every serving backend, forward and gradients), the distillation
loss, and a predictor that learns to keep the attention mass."""

from __future__ import annotations

import math

import pytest
import torch

import multihead as mh
from multihead.errors import ShapeError
from multihead.models.lm import make_causal
from multihead.nn.sparsifiner import ConnectivityPredictor, Sparsifiner, connectivity_loss

BACKENDS = ["reference", "blocksparse", "sdpa", "auto"]


def _qkv(length=14, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, length, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, length, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v


def direct_map(q, k, wq, wk, causal):
    """softmax_j((q_i P_q) . (k_j P_k) / sqrt(rank)) per head, over j <= i when causal."""
    group = q.shape[1] // k.shape[1]
    pq = torch.einsum("bhld,hdr->bhlr", q, wq)
    pk = torch.einsum("bhld,hdr->bhlr", k, wk).repeat_interleave(group, 1)
    c = pq @ pk.transpose(-2, -1) / math.sqrt(wq.shape[-1])
    if causal:
        c = c.masked_fill(~torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(), float("-inf"))
    return c.softmax(-1)


@pytest.mark.parametrize("causal", [False, True])
def test_predictor_is_the_low_rank_approximate_map_forward_and_gradients(causal):
    q, k, _ = _qkv()
    predictor = ConnectivityPredictor(4, 2, 8, 3, causal).double()
    leaves = [t.clone().requires_grad_() for t in (q, k)]
    got = predictor(*leaves)
    mine = [t.clone().requires_grad_() for t in (q, k, predictor.q_weight.detach(), predictor.k_weight.detach())]
    want = direct_map(*mine, causal)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    for a, b in zip([*leaves, predictor.q_weight, predictor.k_weight], mine):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_on_the_binarised_top_k_mask_forward_and_gradients(backend, causal):
    q, k, v = _qkv()
    predictor = ConnectivityPredictor(4, 2, 8, 3, causal).double()
    selection = predictor.select(q, k, 4)
    approx = direct_map(q, k, predictor.q_weight.detach(), predictor.k_weight.detach(), causal)
    mask = torch.zeros_like(approx, dtype=torch.bool)
    for b in range(2):
        for h in range(4):
            for i in range(14):
                allowed = list(range(i + 1)) if causal else list(range(14))
                best = sorted(allowed, key=lambda j: -float(approx[b, h, i, j]))[:4]
                mask[b, h, i, best] = True
    assert torch.equal(selection.dense_mask(14, 14), mask)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = mh.attention(*leaves, pattern=selection, backend=backend)
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    logits = mine[0] @ mine[1].repeat_interleave(2, 1).transpose(-2, -1) / math.sqrt(8)
    want = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ mine[2].repeat_interleave(2, 1)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    for a, b in zip(leaves, mine):
        torch.testing.assert_close(a.grad, b.grad)


def test_connectivity_loss_is_the_kl_from_the_full_map():
    q, k, _ = _qkv()
    predictor = ConnectivityPredictor(4, 2, 8, 3).double()
    approx = predictor(q, k)
    full = (q @ k.repeat_interleave(2, 1).transpose(-2, -1) / math.sqrt(8)).softmax(-1)
    want = (full * (full.log() - approx.log())).sum(-1).mean()
    torch.testing.assert_close(connectivity_loss(approx, q, k), want)
    assert connectivity_loss(full, q, k).abs() < 1e-12


def test_module_causality_follows_its_flag():
    torch.manual_seed(0)
    module = Sparsifiner(32, 4, 2, top_k=3, rank=4, causal=True)
    x = torch.randn(2, 12, 32)
    y = module(x)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 5, 32)
    torch.testing.assert_close(module(x2)[:, :7], y[:, :7])
    assert make_causal(module) is module
    with pytest.raises(ShapeError, match="causal"):
        make_causal(Sparsifiner(32, 4, top_k=3))


@pytest.mark.parametrize("tokens", [None, 96])
def test_predictor_learns_by_distillation_and_keeps_more_attention_mass(tokens):
    torch.manual_seed(0)
    module = Sparsifiner(32, 4, top_k=16, rank=4 if tokens is None else 16, tokens=tokens)
    centers = torch.randn(4, 32, generator=torch.Generator().manual_seed(7)) * 2

    def data(gen, batch=8, length=96):
        kinds = torch.randint(4, (batch, length), generator=gen)
        return centers[kinds] + 0.5 * torch.randn(batch, length, 32, generator=gen)

    with torch.no_grad():  # same-kind tokens attend to each other
        module.q_proj.weight.copy_(torch.eye(32) * 0.6)
        module.k_proj.weight.copy_(torch.eye(32) * 0.6)

    @torch.no_grad()
    def mass_kept(x):
        q, k, _ = module.project(x, x)
        full = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1)
        return float((full * module.predictor.select(q, k, 16).dense_mask(96, 96)).sum(-1).mean())

    probe = data(torch.Generator().manual_seed(99))
    before = mass_kept(probe)
    opt = torch.optim.Adam(module.predictor.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(120):
        loss = module.connectivity_loss(data(gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = mass_kept(probe)
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    print(f"sparsifiner: loss {start:.3f} -> {end:.3f}; attention mass kept {before:.3f} -> {after:.3f}")
    assert end < 0.5 * start
    assert after > before + 0.1


def test_sparsifiner_errors_name_the_argument():
    q, k, _ = _qkv()
    with pytest.raises(ShapeError, match="built for"):
        ConnectivityPredictor(2, 2, 8, 3)(q, k)
    with pytest.raises(ShapeError, match="top_k"):
        ConnectivityPredictor(4, 2, 8, 3).select(q.float(), k.float(), 0)
    with pytest.raises(ShapeError, match="rank"):
        Sparsifiner(32, 4, rank=0)
    with pytest.raises(ShapeError, match="pattern"):
        Sparsifiner(32, 4, pattern=object())


@pytest.mark.parametrize("causal", [False, True])
def test_token_low_rank_predictor_is_q_times_projected_keys_times_the_up_basis(causal):
    from multihead.nn.sparsifiner import TokenConnectivityPredictor

    torch.manual_seed(0)
    q, k, _ = _qkv()
    predictor = TokenConnectivityPredictor(4, 2, 8, 3, 14, causal).double()
    leaves = [t.clone().requires_grad_() for t in (q, k)]
    got = predictor(*leaves)
    mine = [t.clone().requires_grad_() for t in (q, k, predictor.down.detach(), predictor.up.detach())]
    q2, k2, down, up = mine
    summary = torch.einsum("rn,bhnd->bhrd", down, k2).repeat_interleave(2, 1)  # E k: rank summary keys
    c = (q2 @ summary.transpose(-2, -1) / math.sqrt(8)) @ up  # back to every key by W_up
    if causal:
        c = c.masked_fill(~torch.ones(14, 14, dtype=torch.bool).tril(), float("-inf"))
    want = c.softmax(-1)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    for a, b in zip([*leaves, predictor.down, predictor.up], mine):
        torch.testing.assert_close(a.grad, b.grad)
    module = Sparsifiner(32, 4, 2, top_k=3, rank=4, tokens=14)
    assert isinstance(module.predictor, TokenConnectivityPredictor)
    assert module(torch.randn(2, 14, 32)).shape == (2, 14, 32)
    with pytest.raises(ShapeError, match="14 tokens"):
        module(torch.randn(2, 12, 32))
