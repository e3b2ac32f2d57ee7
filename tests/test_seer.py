"""SeerAttention against a direct transcription of the paper: the gate (pooled q and k, projections,
block softmax), the distillation target (block max-pool of the full map, renormalised), the
block-sparse attention on the chosen blocks (every serving backend, forward and gradients), and the
gate learning from its distillation loss."""

from __future__ import annotations

import math

import pytest
import torch

import multihead as mh
from multihead.errors import ShapeError
from multihead.heads.seer import SeerAttention, SeerGate, block_pool, seer_loss, seer_target, select_blocks
from multihead.models.lm import make_causal
from multihead.patterns import Causal

BACKENDS = ["reference", "blocksparse", "sdpa", "auto"]


def _qk(length=22, heads=4, kv_heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(2, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(2, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    return q, k, v


def direct_gate(q, k, wq, wk, block, causal=True):
    """AttnGate written out per block: avg-pooled q; [max, min, avg]-pooled k; per-head projections;
    softmax over the (earlier, when causal) key blocks of (q_pool Wq) . (k_pool Wk) / sqrt(gate_dim)."""
    batch, heads, length, _ = q.shape
    group = heads // k.shape[1]
    blocks = -(-length // block)
    out = []
    for b in range(batch):
        for h in range(heads):
            pq = [q[b, h, i * block:(i + 1) * block].mean(0) @ wq[h] for i in range(blocks)]
            ks = [k[b, h // group, j * block:(j + 1) * block] for j in range(blocks)]
            pk = [torch.cat([t.max(0).values, t.min(0).values, t.mean(0)]) @ wk[h // group] for t in ks]
            for i in range(blocks):
                logits = torch.stack([pq[i] @ pk[j] for j in range(blocks)]) / math.sqrt(wq.shape[-1])
                if causal:
                    logits = logits.masked_fill(torch.arange(blocks) > i, float("-inf"))
                out.append(torch.softmax(logits, 0))
    return torch.stack(out).view(batch, heads, blocks, blocks)


def direct_target(q, k, block, causal=True):
    """Full map softmax(q k^T / sqrt(d)), max over each block x block tile, rows renormalised."""
    group = q.shape[1] // k.shape[1]
    logits = q @ k.repeat_interleave(group, 1).transpose(-2, -1) / math.sqrt(q.shape[-1])
    length = q.shape[2]
    if causal:
        logits = logits.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    a = logits.softmax(-1)
    blocks = -(-length // block)
    t = torch.zeros(*a.shape[:2], blocks, blocks, dtype=a.dtype)
    for i in range(blocks):
        for j in range(blocks):
            t[..., i, j] = a[..., i * block:(i + 1) * block, j * block:(j + 1) * block].amax((-2, -1))
    return t / t.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [True, False])
def test_gate_is_the_papers_pooled_block_attention_forward_and_gradients(causal):
    q, k, _ = _qk()
    gate = SeerGate(4, 2, 8, 5, gate_dim=6, causal=causal).double()
    leaves = [t.clone().requires_grad_() for t in (q, k)]
    got = gate(*leaves)
    wq, wk = (w.detach().clone().requires_grad_() for w in (gate.q_weight, gate.k_weight))
    mine = [t.clone().requires_grad_() for t in (q, k)]
    want = direct_gate(*mine, wq, wk, 5, causal)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    for a, b in zip([*leaves, gate.q_weight, gate.k_weight], [*mine, wq, wk]):
        torch.testing.assert_close(a.grad, b.grad)


def test_block_pool_handles_a_short_last_block():
    x = torch.arange(7, dtype=torch.float64).view(1, 1, 7, 1)
    assert block_pool(x, 3, "avg").flatten().tolist() == [1.0, 4.0, 6.0]
    assert block_pool(x, 3, "max").flatten().tolist() == [2.0, 5.0, 6.0]
    assert block_pool(x, 3, "min").flatten().tolist() == [0.0, 3.0, 6.0]


@pytest.mark.parametrize("causal", [True, False])
def test_target_is_the_block_max_pool_of_the_full_map_renormalised(causal):
    q, k, _ = _qk()
    got = seer_target(q, k, 5, causal=causal)
    torch.testing.assert_close(got, direct_target(q, k, 5, causal))
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)))


def test_loss_is_the_kl_divergence_and_zero_at_the_target():
    q, k, _ = _qk()
    target = seer_target(q, k, 5)
    assert seer_loss(target, target).abs() < 1e-12
    scores = torch.softmax(torch.randn_like(target).masked_fill(target == 0, float("-inf")), -1)
    kl = (target * (target.log() - scores.log())).nan_to_num().sum(-1).mean()
    torch.testing.assert_close(seer_loss(scores, target), kl)
    with pytest.raises(ShapeError, match="one shape"):
        seer_loss(scores[..., :2], target)


def _selection_mask(selection, length, causal):
    mask = selection.dense_mask(length, length)
    return mask & torch.ones(length, length, dtype=torch.bool).tril() if causal else mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_on_the_chosen_blocks_is_masked_softmax_forward_and_gradients(backend, causal):
    q, k, v = _qk(length=26)
    gate = SeerGate(4, 2, 8, 4, causal=causal).double()
    selection = select_blocks(gate(q, k), 2, 4, 26, causal=causal)
    mask = _selection_mask(selection, 26, causal)
    # the chosen blocks, by hand: the diagonal block plus the best other (earlier) block per query block
    scores = gate(q, k)
    for b, h, i in [(0, 0, 0), (1, 3, 6), (0, 2, 3)]:
        ranked = scores[b, h, i].clone()
        if causal:
            ranked[i + 1:] = -1
        ranked[i] = 2
        best = set(ranked.topk(2).indices.tolist()) if (i > 0 or not causal) else {0}
        read = {j // 4 for j in range(26) if mask[b, h, i * 4, j]}
        assert read == best
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    pattern = Causal() & selection if causal else selection
    got = mh.attention(*leaves, pattern=pattern, backend=backend)
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    logits = mine[0] @ mine[1].repeat_interleave(2, 1).transpose(-2, -1) / math.sqrt(8)
    want = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ mine[2].repeat_interleave(2, 1)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    for a, b in zip(leaves, mine):
        torch.testing.assert_close(a.grad, b.grad)


def test_module_runs_block_sparse_on_the_chosen_blocks():
    torch.manual_seed(0)
    module = SeerAttention(64, 4, block=64, top_k=2)
    x = torch.randn(1, 1024, 64)
    q, k, v = module.project(x, x)
    pattern = Causal() & module.selection(q, k)
    assert pattern.density(1024, 1024) < 0.2
    assert "blocksparse" in str(mh.explain(q, k, v, pattern=pattern, show=False)).split("\n")[0]
    y = module(x)
    module.backend = "reference"
    torch.testing.assert_close(y, module(x), atol=1e-5, rtol=1e-4)


def test_module_is_block_causal_and_an_lm_refuses_it():
    """A query's output never depends on later blocks; the gate reads its own block whole (as the
    paper gates a prompt), so a later token of the same block may change the choice: not token-causal,
    and make_causal says so instead of wrapping it."""
    torch.manual_seed(0)
    module = SeerAttention(32, 4, 2, block=4, top_k=2)
    x = torch.randn(2, 22, 32)
    y = module(x)
    x2 = x.clone()
    x2[:, 12:] = torch.randn(2, 10, 32)
    torch.testing.assert_close(module(x2)[:, :12], y[:, :12])
    leaks = []
    for seed in range(5):
        x3 = x.clone()
        x3[:, 13:] = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(seed))
        leaks.append(not torch.allclose(module(x3)[:, 12], y[:, 12]))
    assert any(leaks)  # the choice for token 12 reads tokens 13-15 of its block
    for causal in (True, False):
        with pytest.raises(ShapeError, match="causal"):
            make_causal(SeerAttention(32, 4, block=4, causal=causal))


def _clustered(gen, batch=8, length=128, dim=32, block=16, types=4):
    """Every block of tokens has one type; a token's embedding is its type's plus noise."""
    centers = torch.randn(types, dim, generator=torch.Generator().manual_seed(7)) * 2
    kinds = torch.randint(types, (batch, length // block), generator=gen).repeat_interleave(block, 1)
    return centers[kinds] + 0.5 * torch.randn(batch, length, dim, generator=gen)


def _mass_kept(module, x):
    """Share of the full attention map's mass that falls inside the gate's chosen blocks."""
    q, k, _ = module.project(x, x)
    full = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(
        ~torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril(), float("-inf")), -1)
    keep = Causal() & module.selection(q, k)
    return float((full * keep.dense_mask(x.shape[1], x.shape[1])).sum(-1).mean())


def test_gate_learns_by_distillation_and_keeps_more_attention_mass():
    torch.manual_seed(0)
    module = SeerAttention(32, 4, block=16, top_k=2)
    with torch.no_grad():  # same-type tokens attend to each other: the map has block structure
        module.q_proj.weight.copy_(torch.eye(32) * 0.6)
        module.k_proj.weight.copy_(torch.eye(32) * 0.6)
    for p in module.parameters():
        p.requires_grad_(False)
    for p in module.gate.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    probe = _clustered(torch.Generator().manual_seed(99))
    before = _mass_kept(module, probe)
    opt = torch.optim.Adam(module.gate.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = module.gate_loss(_clustered(gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    after = _mass_kept(module, probe)
    print(f"seer gate: loss {start:.3f} -> {end:.3f}, attention mass kept {before:.3f} -> {after:.3f}")
    assert end < 0.5 * start
    assert after > before + 0.1


def test_seer_errors_name_the_argument():
    q, k, _ = _qk()
    with pytest.raises(ShapeError, match="kv_len"):
        SeerGate(4, 2, 8, 4)(q, k[:, :, :5])
    with pytest.raises(ShapeError, match="built for"):
        SeerGate(2, 2, 8, 4)(q, k)
    with pytest.raises(ShapeError, match="top_k"):
        select_blocks(seer_target(q, k, 4), 0, 4, 22)
    with pytest.raises(ShapeError, match="cover"):
        select_blocks(seer_target(q, k, 4), 2, 5, 22)
    with pytest.raises(ShapeError, match="block"):
        SeerAttention(32, 4, block=0)
    with pytest.raises(ShapeError, match="pattern"):
        SeerAttention(32, 4, pattern=Causal())
    with pytest.raises(ShapeError, match="kv_heads"):
        SeerGate(4, 3, 8, 4)
