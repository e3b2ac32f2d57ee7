"""Mesa-style memory-saving attention: exact forward, gradients from 8-bit per-head q, k, v within
the rounding error, the bytes kept for backward measured against plain attention, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import multihead as mh
from multihead.errors import ShapeError
from multihead.nn import MultiHeadAttention
from multihead.nn.mesa import LEVELS, MesaAttention, dequantize, mesa_attention, quantize_per_head, saved_bytes
from multihead.patterns import Causal, SlidingWindow
from multihead.scores import ALiBi, RelativePositionBias


def test_per_head_quantisation_rounds_within_half_a_step():
    x = torch.randn(2, 3, 40, 8) * torch.tensor([0.1, 1.0, 10.0]).view(1, 3, 1, 1)
    codes, scale = quantize_per_head(x)
    assert codes.dtype == torch.int8 and scale.shape == (2, 3, 1, 1)
    torch.testing.assert_close(scale, x.abs().amax((-2, -1), keepdim=True) / LEVELS)
    assert ((dequantize(codes, scale) - x).abs() <= scale / 2 + 1e-7).all()


@pytest.mark.parametrize("backend", ["reference", "blocksparse", "sdpa"])
@pytest.mark.parametrize("pattern,score", [(Causal(), None), (SlidingWindow(5, 5), ALiBi(4))])
def test_forward_is_exact_and_gradients_are_those_at_the_dequantised_inputs(backend, pattern, score):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 16, requires_grad=True) for _ in range(3))
    out = mesa_attention(q, k, v, pattern=pattern, score=score, backend=backend)
    exact = mh.attention(q, k, v, pattern=pattern, score=score, backend=backend)
    assert torch.equal(out, exact)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    # the recomputation: plain autograd of the attention at the dequantised q, k, v
    deq = [dequantize(*quantize_per_head(t)).requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(mh.attention(*deq, pattern=pattern, score=score, backend=backend), deq, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    true = torch.autograd.grad(exact, (q, k, v), dout)
    for a, b in zip(got, true):  # and close to the exact gradients: 8-bit rounding only
        assert (a - b).norm() / b.norm() < 0.05


def test_kept_bytes_fall_to_a_quarter_of_q_k_v_and_below_every_backend():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1024, 64, requires_grad=True) for _ in range(3))
    qkv_bytes = 3 * q.numel() * q.element_size()
    _, mesa = saved_bytes(mesa_attention, q, k, v, pattern=Causal())
    assert mesa <= qkv_bytes / 4 + 3 * 8 * 4  # int8 codes plus one float scale per head
    for backend in ("sdpa", "reference", "blocksparse"):
        _, plain = saved_bytes(mh.attention, q, k, v, pattern=Causal(), backend=backend)
        print(f"kept for backward, causal 1024 x 8 heads x 64: {backend} {plain / 2**20:.1f} MiB, "
              f"mesa {mesa / 2**20:.2f} MiB")
        assert mesa < plain / 4


def test_module_matches_multiheadattention_and_trains():
    torch.manual_seed(0)
    mesa = MesaAttention(32, 4, 2, pattern=Causal())
    plain = MultiHeadAttention(32, 4, 2, pattern=Causal())
    plain.load_state_dict(mesa.state_dict())
    x = torch.randn(2, 20, 32)
    torch.testing.assert_close(mesa(x), plain(x))

    def train(attn):
        torch.manual_seed(1)
        embed, pos, head = nn.Embedding(5, 32), nn.Parameter(torch.randn(20, 32)), nn.Linear(32, 5)
        opt = torch.optim.Adam([*attn.parameters(), *embed.parameters(), pos, *head.parameters()], lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(120):  # predict the token 3 places back
            tokens = torch.randint(5, (16, 20), generator=gen)
            x = embed(tokens) + pos
            logits = head(x + attn(x))[:, 3:]
            loss = nn.functional.cross_entropy(logits.reshape(-1, 5), tokens[:, :-3].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return sum(losses[:5]) / 5, sum(losses[-10:]) / 10

    (start, end), (_, plain_end) = train(mesa), train(plain)
    print(f"mesa copy task: loss {start:.3f} -> {end:.3f} (full-precision backward: {plain_end:.3f})")
    assert end < 0.3 * start and end < plain_end + 0.1


def test_mesa_refuses_what_it_cannot_recompute():
    q = k = v = torch.randn(1, 2, 8, 4, requires_grad=True)
    with pytest.raises(ShapeError, match="trainable"):
        mesa_attention(q, k, v, score=RelativePositionBias(2))
    with pytest.raises(ShapeError, match="dropout"):
        MesaAttention(16, 2, dropout=0.1)
    with pytest.raises(ShapeError, match="key_padding_mask"):
        MesaAttention(16, 2)(torch.randn(1, 4, 16), key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
