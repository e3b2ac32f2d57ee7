"""Recycled Attention against a direct transcription of the paper's decoding loop (forward and
gradients on every serving backend), its causality, and a training run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multihead.errors import ShapeError
from multihead.models.lm import make_causal
from multihead.nn.recycled import RecycledAttention, recycled_attention, recycled_rows

BACKENDS = ["reference", "blocksparse", "sdpa", "auto"]


def direct(q, k, v, prompt, stride, top_k):
    """Token by token: the prompt rows attend causally; decoding step t = position prompt + t; a full
    step (t % stride == 0) attends to every key up to itself and, per key/value head, keeps the
    top_k keys before its own position by its weights summed over that head's query heads; a partial
    step attends to those kept keys plus every key from the last full step's position to its own."""
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=q.dtype)
    rows = {}
    for b in range(batch):
        kept, last = {}, None
        for pos in range(length):
            t = pos - prompt
            if t >= 0 and t % stride == 0:
                full = [torch.softmax(k[b, h // group, : pos + 1] @ q[b, h, pos] / math.sqrt(dim), 0)
                        for h in range(heads)]
                for g in range(k.shape[1]):
                    summed = sum(full[h].detach() for h in range(g * group, (g + 1) * group))
                    kept[g] = set(summed[:pos].topk(min(top_k, pos)).indices.tolist())
                last = pos
            for h in range(heads):
                if t <= 0 or t % stride == 0:
                    keys = list(range(pos + 1))
                else:
                    keys = sorted(kept[h // group] | set(range(last, pos + 1)))
                logits = k[b, h // group, keys] @ q[b, h, pos] / math.sqrt(dim)
                rows[b, h, pos] = torch.softmax(logits, 0) @ v[b, h // group, keys]
    return torch.stack([rows[b, h, p] for b in range(batch) for h in range(heads) for p in range(length)]).view(
        batch, heads, length, -1)


def _inputs(length=30, heads=4, kv_heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, length, dim, generator=gen, dtype=torch.float64) for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prompt,stride,top_k", [(10, 4, 3), (1, 3, 5), (12, 1, 2), (29, 5, 4)])
def test_recycled_attention_is_the_papers_decoding_loop_forward_and_gradients(backend, prompt, stride, top_k):
    q, k, v = _inputs()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    want = direct(*leaves, prompt, stride, top_k)
    got = recycled_attention(*mine, prompt=prompt, stride=stride, top_k=top_k, backend=backend)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    want.backward(dout)
    got.backward(dout)
    for a, b in zip(mine, leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_enough_recycled_keys_is_full_causal_attention_and_fewer_is_not():
    q, k, v = _inputs()
    from multihead import attention
    from multihead.patterns import Causal

    full = attention(q, k, v, pattern=Causal())
    torch.testing.assert_close(recycled_attention(q, k, v, prompt=8, stride=4, top_k=30), full)
    sparse = recycled_attention(q, k, v, prompt=8, stride=4, top_k=2)
    torch.testing.assert_close(sparse[:, :, :9], full[:, :, :9])  # prompt and the first full step
    assert not torch.allclose(sparse, full)


def test_rows_alternate_full_and_recycled_steps():
    full, partial = recycled_rows(12, 5, 3)
    assert full.tolist() == [5, 8, 11] and partial.tolist() == [6, 7, 9, 10]


def test_module_is_causal_and_trains():
    torch.manual_seed(0)
    module = RecycledAttention(32, 4, 2, stride=4, top_k=6, prompt=8)
    assert make_causal(module) is module
    x = torch.randn(2, 40, 32)
    y = module(x)
    x2 = x.clone()
    x2[:, 25:] = torch.randn(2, 15, 32)
    torch.testing.assert_close(module(x2)[:, :25], y[:, :25])

    class Recall(nn.Module):  # copy the token 16 places back: recycled keys must hold it
        def __init__(self):
            super().__init__()
            self.embed, self.attn = nn.Embedding(8, 32), RecycledAttention(32, 4, stride=2, top_k=8, prompt=16)
            self.pos = nn.Parameter(torch.randn(48, 32) * 0.5)
            self.head = nn.Linear(32, 8)

        def forward(self, tokens):
            x = self.embed(tokens) + self.pos
            return self.head(x + self.attn(x))

    model = Recall()
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        tokens = torch.randint(8, (32, 48), generator=gen)
        logits = model(tokens)[:, 16:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, 8), tokens[:, :32].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    print(f"recycled copy: loss {start:.3f} -> {end:.3f}")
    assert start > 1.8 and end < 0.5 * start


def test_recycled_errors_name_the_argument():
    q, k, v = _inputs()
    with pytest.raises(ShapeError, match="stride"):
        recycled_attention(q, k, v, prompt=4, stride=0, top_k=2)
    with pytest.raises(ShapeError, match="top_k"):
        recycled_attention(q, k, v, prompt=4, stride=2, top_k=0)
    with pytest.raises(ShapeError, match="prompt"):
        recycled_attention(q, k, v, prompt=31, stride=2, top_k=2)
    with pytest.raises(ShapeError, match="equal lengths"):
        recycled_attention(q[:, :, :5], k, v, prompt=4, stride=2, top_k=2)
    with pytest.raises(ShapeError, match="prompt"):
        RecycledAttention(32, 4, prompt=1.5)
    with pytest.raises(ShapeError, match="pattern"):
        RecycledAttention(32, 4, pattern=object())
