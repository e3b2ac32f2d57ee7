"""Pointer Networks: the pointing distribution against the paper's formula (forward and gradients),
masks, and a pointer network that learns to sort."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multihead.errors import ShapeError
from multihead.nn.pointer import PointerAttention


@pytest.mark.parametrize("steps", [4, 9])
def test_additive_pointer_is_the_papers_softmax_over_inputs_forward_and_gradients(steps):
    torch.manual_seed(0)
    head = PointerAttention(6, 5, kv_dim=7).double()
    d = torch.randn(2, steps, 6, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 7, 7, dtype=torch.float64, requires_grad=True)
    allowed = torch.rand(2, steps, 7) > 0.3
    allowed[..., 0] = True
    got = head(d, e, allowed)
    d2, e2 = d.detach().clone().requires_grad_(), e.detach().clone().requires_grad_()
    w1, w2, v = (p.detach().clone().requires_grad_() for p in (head.w_encoder.weight, head.w_decoder.weight,
                                                                  head.v.weight))
    rows = []
    for b in range(2):
        for i in range(steps):  # u_ij = v^T tanh(W1 e_j + W2 d_i), softmax over the allowed j
            u = torch.stack([(v @ torch.tanh(w1 @ e2[b, j] + w2 @ d2[b, i]))[0] for j in range(7)])
            rows.append(torch.softmax(u.masked_fill(~allowed[b, i], float("-inf")), 0))
    want = torch.stack(rows).view(2, steps, 7)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    for a, b in [(d.grad, d2.grad), (e.grad, e2.grad), (head.w_encoder.weight.grad, w1.grad),
                 (head.w_decoder.weight.grad, w2.grad), (head.v.weight.grad, v.grad)]:
        torch.testing.assert_close(a, b)
    assert (got[~allowed] == 0).all()


def test_dot_pointer_is_softmax_of_the_bilinear_score():
    torch.manual_seed(0)
    head = PointerAttention(6, kind="dot", kv_dim=4).double()
    d, e = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    want = torch.softmax(head.w(d) @ e.transpose(1, 2), -1)
    torch.testing.assert_close(head(d, e), want)
    torch.testing.assert_close(head.log_probs(d, e), want.log())


class SortNet(nn.Module):
    """Encoder LSTM over the numbers, decoder LSTM fed the previously pointed number (teacher forced),
    pointer over the inputs that were not pointed at yet."""

    def __init__(self, hidden=32):
        super().__init__()
        self.embed = nn.Linear(1, hidden)
        self.encoder, self.decoder = nn.LSTM(hidden, hidden, batch_first=True), nn.LSTM(hidden, hidden, batch_first=True)
        self.start = nn.Parameter(torch.zeros(hidden))
        self.pointer = PointerAttention(hidden)

    def forward(self, x, order):
        batch, n = x.shape
        e, state = self.encoder(self.embed(x.unsqueeze(-1)))
        chosen = x.gather(1, order)
        inputs = torch.cat([self.start.expand(batch, 1, -1), self.embed(chosen[:, :-1].unsqueeze(-1))], 1)
        d, _ = self.decoder(inputs, state)
        taken = torch.zeros(batch, n, n, dtype=torch.bool)
        for i in range(1, n):  # step i may not point at what steps < i chose
            taken[:, i] = taken[:, i - 1]
            taken[torch.arange(batch), i, order[:, i - 1]] = True
        return self.pointer.log_probs(d, e, ~taken)


def test_pointer_network_learns_to_sort():
    torch.manual_seed(0)
    model = SortNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(200):
        x = torch.rand(64, 6, generator=gen)
        order = x.argsort(1)
        logp = model(x, order)
        loss = -logp.gather(2, order.unsqueeze(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    x = torch.rand(256, 6, generator=gen)
    order = x.argsort(1)
    with torch.no_grad():
        hits = (model(x, order).argmax(-1) == order).float().mean()
    print(f"pointer sort: loss {start:.3f} -> {end:.3f}, {hits:.2f} of the steps right")
    assert end < 0.4 * start, f"loss {start:.3f} -> {end:.3f}"
    assert hits > 0.8, f"{hits:.2f} of the steps point at the right number"


def test_pointer_errors_name_the_argument():
    head = PointerAttention(4)
    d, e = torch.randn(1, 2, 4), torch.randn(1, 3, 4)
    with pytest.raises(ShapeError, match="kind"):
        PointerAttention(4, kind="cosine")
    with pytest.raises(ShapeError, match="no input"):
        head(d, e, torch.zeros(1, 2, 3, dtype=torch.bool))
    with pytest.raises(ShapeError, match="allowed"):
        head(d, e, torch.ones(1, 2, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match="encoder"):
        head(d, torch.randn(1, 3, 5))
