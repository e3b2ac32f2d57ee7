"""MultiHeadAttention: equal to torch.nn.MultiheadAttention, and the same on every backend."""

from __future__ import annotations

import pytest
import torch

from multihead import BackendError
from multihead.backends import BACKENDS
from multihead.nn import MultiHeadAttention
from multihead.patterns import Causal, SlidingWindow
from multihead.scores import ALiBi, RoPE

DIM, HEADS = 32, 4


def torch_padding(batch, length):
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, -3:] = True
    mask[1, -6:] = True
    return mask


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_from_torch_matches_outputs_and_gradients(batch_first, causal, padded, cross):
    torch.manual_seed(0)
    kdim = 24 if cross else DIM
    ref = torch.nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
    mine = MultiHeadAttention.from_torch(ref, pattern=Causal() if causal else None)
    x = torch.randn(3, 10, DIM)
    context = torch.randn(3, 10, kdim) if cross else x
    padding = torch_padding(3, 10) if padded else None
    attn_mask = torch.ones(10, 10, dtype=torch.bool).triu(1) if causal else None

    x1 = x.clone().requires_grad_()
    c1 = context.clone().requires_grad_() if cross else x1
    args = (x1, c1, c1) if batch_first else (x1.transpose(0, 1), c1.transpose(0, 1), c1.transpose(0, 1))
    want, want_w = ref(*args, key_padding_mask=padding, attn_mask=attn_mask, need_weights=True)
    want = want if batch_first else want.transpose(0, 1)
    want.sum().backward()

    x2 = x.clone().requires_grad_()
    c2 = context.clone().requires_grad_() if cross else None
    got, got_w = mine(x2, c2, key_padding_mask=padding, need_weights=True)
    got.sum().backward()

    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_w.mean(1), want_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    if cross:
        torch.testing.assert_close(c2.grad, c1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.q_proj.weight.grad, ref.in_proj_weight.grad[:DIM] if ref._qkv_same_embed_dim
                               else ref.q_proj_weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.out_proj.weight.grad, ref.out_proj.weight.grad, atol=1e-5, rtol=1e-5)


def test_from_torch_without_bias():
    ref = torch.nn.MultiheadAttention(DIM, HEADS, bias=False, batch_first=True)
    mine = MultiHeadAttention.from_torch(ref)
    x = torch.randn(2, 7, DIM)
    torch.testing.assert_close(mine(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [HEADS, 2, 1], ids=["mha", "gqa", "mqa"])
def test_module_is_the_same_on_every_backend(kv_heads):
    torch.manual_seed(0)
    module = MultiHeadAttention(DIM, HEADS, kv_heads=kv_heads, pattern=Causal() & SlidingWindow(4),
                                score=ALiBi(HEADS), position=RoPE(DIM // HEADS))
    assert module.k_proj.out_features == kv_heads * DIM // HEADS
    x = torch.randn(2, 12, DIM)
    outputs = {}
    for name in BACKENDS:
        module.backend = name
        try:
            outputs[name] = module(x)
        except BackendError:  # this backend cannot serve the module (e.g. no backward on CPU)
            continue
    for name, out in outputs.items():
        torch.testing.assert_close(out, outputs["reference"], atol=1e-5, rtol=1e-5, msg=name)


def test_need_weights_are_per_head_and_respect_padding():
    module = MultiHeadAttention(DIM, HEADS)
    x = torch.randn(2, 6, DIM)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    out, weights = module(x, key_padding_mask=padding, need_weights=True)
    assert out.shape == (2, 6, DIM) and weights.shape == (2, HEADS, 6, 6)
    assert (weights[1, :, :, 4:] == 0).all()


def test_dropout_only_in_training():
    module = MultiHeadAttention(DIM, HEADS, dropout=0.5)
    x = torch.randn(1, 8, DIM)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    assert not torch.equal(module(x), module(x))


def test_explicit_head_dim_and_cross_attention_lengths():
    module = MultiHeadAttention(DIM, HEADS, head_dim=5, kv_dim=12, pattern=Causal())
    out = module(torch.randn(2, 3, DIM), torch.randn(2, 9, 12))
    assert out.shape == (2, 3, DIM)
