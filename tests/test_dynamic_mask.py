"""Dynamic Mask Attention against a direct transcription of the paper (value-derived key weights,
top-window keys per query, weights added to the kept logits): every serving backend, forward and
gradients; and a model whose mask learns to keep the keys that matter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multihead.errors import ShapeError
from multihead.models.lm import make_causal
from multihead.nn.dynamic_mask import DynamicMaskAttention, dynamic_mask_attention, dynamic_mask_request

BACKENDS = ["reference", "blocksparse", "sdpa", "auto"]


def direct(q, k, v, mask, window):
    """Per query i (position p): among keys j <= p keep the `window` with the largest m_j (ties: the
    later key), then softmax_j(q_i . k_j / sqrt(d) + m_j) over the kept keys."""
    batch, heads, q_len, dim = q.shape
    kv_len, group = k.shape[2], heads // k.shape[1]
    rows = []
    for b in range(batch):
        for h in range(heads):
            g = h // group
            for i in range(q_len):
                p = i + kv_len - q_len
                visible = sorted(range(p + 1), key=lambda j: (-float(mask[b, g, j].detach()), -j))
                kept = sorted(visible[:window])
                logits = k[b, g, kept] @ q[b, h, i] / math.sqrt(dim) + mask[b, g, kept]
                rows.append(torch.softmax(logits, 0) @ v[b, g, kept])
    return torch.stack(rows).view(batch, heads, q_len, -1)


def _inputs(q_len=18, kv_len=18, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, q_len, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, kv_len, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.exp(-torch.rand(2, 2, kv_len, generator=gen, dtype=torch.float64) * 3)
    mask[:, :, 5:8] = mask[:, :, 4:5]  # ties
    return q, k, v, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,q_len", [(5, 18), (1, 18), (30, 18), (6, 4)])
def test_dynamic_mask_attention_is_the_papers_formula_forward_and_gradients(backend, window, q_len):
    q, k, v, mask = _inputs(q_len=q_len)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    mine = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    want = direct(*leaves, window)
    got = dynamic_mask_attention(*mine, window, backend=backend)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    want.backward(dout)
    got.backward(dout)
    for a, b in zip(mine, leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_module_key_weights_are_exp_a_softplus_of_the_values():
    torch.manual_seed(0)
    module = DynamicMaskAttention(32, 4, 2, window=6)
    with torch.no_grad():
        module.A.copy_(torch.tensor([-0.5, -2.0]))
    x = torch.randn(2, 11, 32)
    q, k, v = module.project(x, x)
    flat = v.transpose(1, 2).reshape(2, 11, -1)  # the values of every kv head of a token
    want = torch.exp(module.A.view(1, -1, 1) * F.softplus(flat @ module.dt_proj.weight.T).transpose(1, 2))
    torch.testing.assert_close(module.key_weights(v), want)
    torch.testing.assert_close(module(x), module.combine(dynamic_mask_attention(q, k, v, want, 6), x))
    assert make_causal(module) is module
    fresh = DynamicMaskAttention(32, 4, window=6)
    assert torch.equal(fresh.key_weights(torch.randn(1, 4, 5, 8)), torch.ones(1, 4, 5))


def test_the_mask_learns_to_keep_the_tokens_that_matter():
    """Recall among distractors: 6 key-value pairs and 6 noise tokens in random order, then the query;
    a window of 7 keys cannot hold all, so the value-derived mask must learn to drop the noise."""
    torch.manual_seed(0)
    keys, values, pairs, noise, batch = 16, 8, 6, 6, 64

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.k, self.v = nn.Embedding(keys + 1, 32), nn.Embedding(values + 2, 32)
            self.attn, self.norm, self.head = DynamicMaskAttention(32, 4, window=7), nn.LayerNorm(32), nn.Linear(32, values)

        def forward(self, tk, tv):
            x = self.k(tk) + self.v(tv)
            return self.head(self.norm(x + self.attn(x))[:, -1])

    def data(gen):
        k = torch.rand(batch, keys, generator=gen).argsort(-1)[:, :pairs]
        v = torch.randint(values, (batch, pairs), generator=gen)
        tk = torch.cat([k, torch.full((batch, noise), keys)], 1)
        tv = torch.cat([v, torch.full((batch, noise), values + 1)], 1)
        order = torch.rand(batch, pairs + noise, generator=gen).argsort(-1)
        tk, tv = tk.gather(1, order), tv.gather(1, order)
        which = torch.randint(pairs, (batch,), generator=gen)
        rows = torch.arange(batch)
        tk = torch.cat([tk, k[rows, which, None]], 1)
        tv = torch.cat([tv, torch.full((batch, 1), values)], 1)
        return (tk, tv), v[rows, which]

    def pairs_kept(model):
        """Pair tokens among the keys the last query keeps, in the head that keeps most (6: all)."""
        (tk, tv), _ = data(torch.Generator().manual_seed(5))
        with torch.no_grad():
            x = model.k(tk) + model.v(tv)
            _, _, v = model.attn.project(x, x)
            selection, _ = dynamic_mask_request(model.attn.key_weights(v), 13, 4, 7)
        kept = selection.key_lists()[0][:, :, -1]  # (batch, heads, window)
        per_head = (tv.unsqueeze(1).expand(-1, 4, -1).gather(2, kept) < values).sum(-1).float().mean(0)
        return float(per_head.max())

    model = Model()
    before = pairs_kept(model)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        inputs, target = data(gen)
        loss = F.cross_entropy(model(*inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    after = pairs_kept(model)
    print(f"dynamic mask recall: loss {start:.3f} -> {end:.3f}; pairs kept {before:.2f} -> {after:.2f} of 6")
    assert end < 0.5 * start
    assert before < 4.5 and after > 5.0  # one head learns to keep the pairs, not the noise


def test_dynamic_mask_errors_name_the_argument():
    q, k, v, mask = _inputs()
    with pytest.raises(ShapeError, match="window"):
        dynamic_mask_attention(q, k, v, mask, 0)
    with pytest.raises(ShapeError, match="mask"):
        dynamic_mask_attention(q, k, v, mask[:, :, :5], 4)
    with pytest.raises(ShapeError, match="q_len"):
        dynamic_mask_attention(q, k[:, :, :5], v[:, :, :5], mask[:, :, :5], 4)
    with pytest.raises(ShapeError, match="pattern"):
        DynamicMaskAttention(32, 4, pattern=object())
    with pytest.raises(ShapeError, match="context"):
        DynamicMaskAttention(32, 4, window=3)(torch.randn(1, 5, 32), torch.randn(1, 5, 32))
