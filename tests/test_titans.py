"""Titans' neural memory against the paper's recurrence written token by token (forward and gradients),
the chunked mini-batch form, the MAG layer on every backend, causality, training."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import copy_back_losses

from multihead.errors import ShapeError
from multihead.models import TransformerLM
from multihead.models.lm import make_causal
from multihead.nn.titans import NeuralMemory, TitansGatedAttention, memory_read


def recurrence(mem: NeuralMemory, x, closed_form=False):
    """S_t = eta_t S_{t-1} - theta_t grad ||M(k_t) - v_t||^2 (at the chunk's starting M), M_t = (1 - alpha_t)
    M_{t-1} + S_t, y_t = M_t(q_t), token by token; ``closed_form``: the matrix memory's gradient
    2 k^T (k W - v) instead of autograd."""
    q, k, v, alpha, eta, theta = mem.inputs(x)
    batch, heads, tokens, _ = q.shape
    rows = []
    for b in range(batch):
        per_head = []
        for h in range(heads):
            memory = [p[h] for p in mem.initial]
            surprise = [torch.zeros_like(p) for p in memory]
            reads = []
            for t in range(tokens):
                if t % mem.chunk == 0:
                    start = memory
                kt, vt = k[b, h, t], v[b, h, t]
                if closed_form:
                    grads = [2 * torch.outer(kt, kt @ start[0] - vt)]
                else:
                    loss = (memory_read(tuple(start), kt) - vt).square().sum()
                    grads = torch.autograd.grad(loss, start, create_graph=True)
                surprise = [eta[b, h, t] * s - theta[b, h, t] * g for s, g in zip(surprise, grads)]
                memory = [(1 - alpha[b, h, t]) * m + s for m, s in zip(memory, surprise)]
                reads.append(memory_read(tuple(memory), q[b, h, t]))
            per_head.append(torch.stack(reads))
        rows.append(torch.cat(per_head, -1))
    return mem.out_proj(torch.stack(rows))


@pytest.mark.parametrize("layers,chunk,closed_form", [(1, 1, True), (1, 3, True), (2, 1, False), (2, 4, False)])
def test_memory_is_the_papers_recurrence(layers, chunk, closed_form):
    torch.manual_seed(0)
    mem = NeuralMemory(8, 2, layers=layers, chunk=chunk).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    got, want = mem(x), recurrence(mem, x, closed_form)
    torch.testing.assert_close(got, want)
    inputs = [x, *mem.parameters()]
    for a, b in zip(torch.autograd.grad(got.square().sum(), inputs), torch.autograd.grad(want.square().sum(), inputs)):
        torch.testing.assert_close(a, b)


def test_memory_learns_an_association_at_test_time():
    torch.manual_seed(0)
    mem = NeuralMemory(4, 1, layers=1, chunk=1, max_step=1.0).double()
    with torch.no_grad():
        mem.gates.weight.zero_()
        mem.gates.bias.copy_(torch.tensor([-40.0, -40.0, -1.0]))  # no forgetting, no momentum, theta = 0.27
        mem.q_proj.weight.copy_(mem.k_proj.weight)  # read back at the key that was written
        mem.out_proj.weight.copy_(torch.eye(4))
    x = torch.randn(1, 1, 4, dtype=torch.float64).expand(1, 5, 4)  # one association, shown five times
    errors = (mem(x) - mem.v_proj(x)).norm(dim=-1)[0]
    theta = torch.sigmoid(torch.tensor(-1.0, dtype=torch.float64))
    # a gradient step on ||k W - v||^2 with |k| = 1 shrinks the error by (1 - 2 theta) each time
    torch.testing.assert_close(errors[1:] / errors[:-1], (1 - 2 * theta).expand(4))


def test_mag_layer_is_window_attention_gated_by_memory_on_every_backend():
    torch.manual_seed(0)
    layer = TitansGatedAttention(8, 2, window=3, persistent=2, chunk=4).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    a = layer.attention
    ext = torch.cat([layer.persistent.expand(2, -1, -1), x], 1)
    q, k, v = (proj(ext).view(2, 11, 2, 4).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
    i, j = torch.arange(11).view(-1, 1), torch.arange(11).view(1, -1)
    allowed = (j < 2) | ((j >= 2) & (j - 2 <= (i - 2).clamp(min=0)) & (j - 2 >= (i - 2).clamp(min=0) - 3))
    weights = (q @ k.transpose(-2, -1) / math.sqrt(4)).masked_fill(~allowed, float("-inf")).softmax(-1)
    y = a.out_proj((weights @ v).transpose(1, 2).reshape(2, 11, 8))[:, 2:]
    m = layer.memory(ext)[:, 2:]
    want = layer.out_proj(layer.attention_norm(y) * torch.sigmoid(layer.memory_norm(m)))
    want_grads = torch.autograd.grad(want.square().sum(), [x, *layer.parameters()])
    for backend in ("reference", "sdpa", "blocksparse", "auto"):
        layer.attention.backend = backend
        got = layer(x)
        torch.testing.assert_close(got, want, msg=backend)
        for g, w in zip(torch.autograd.grad(got.square().sum(), [x, *layer.parameters()]), want_grads):
            torch.testing.assert_close(g, w, msg=backend)


def test_titans_is_causal_and_trains():
    torch.manual_seed(0)
    layer = TitansGatedAttention(16, 2, window=4, persistent=2, chunk=4)
    x = torch.randn(1, 12, 16)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(1, 5, 16)
    torch.testing.assert_close(layer(x2)[:, :7], layer(x)[:, :7])
    assert make_causal(layer) is layer
    model = TransformerLM(8, 32, 1, 2, attention="titans_mag", max_len=16)
    losses = copy_back_losses(model, 80)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:5]) / 5


def test_titans_errors():
    with pytest.raises(ShapeError, match="layers"):
        NeuralMemory(8, 2, layers=3)
    with pytest.raises(ShapeError, match="divide"):
        NeuralMemory(8, 3)
    with pytest.raises(ShapeError, match="chunk"):
        NeuralMemory(8, 2, chunk=0)
    with pytest.raises(ShapeError, match="max_step"):
        NeuralMemory(8, 2, max_step=0.0)
    with pytest.raises(ShapeError, match="max_momentum"):
        NeuralMemory(8, 2, max_momentum=1.0)
