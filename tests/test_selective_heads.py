"""SMHA (Union of Experts) against a transcription of the authors' SMHA_v3 (YujiaoYang-work/UoE,
language_modeling/model/attention/SMHA_v3.py, 9de0cf25) where every head has as many tokens as the
longest, and against a per-head loop (attention among each head's chosen tokens) where they differ:
forward and gradients on every backend, causal and bidirectional; training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_backends_match, copy_back_losses

from multihead.errors import ShapeError
from multihead.heads.selective import SelectiveMultiHeadAttention
from multihead.models import TransformerLM
from multihead.patterns import Causal, SlidingWindow
from multihead.scores import RoPE

BACKENDS = ("reference", "sdpa", "blocksparse", "auto")


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def authors_smha_v3(m: SelectiveMultiHeadAttention, x, capacity=1.0, epsilon=1e-6):
    """SparseSelfAttention.forward of SMHA_v3 (no mems, no dropout, pre-norm: the residual left out),
    with this module's weights cut per expert (= head) as ColumnParallel/RowParallelLinearWithMoE hold them."""
    batch_size, seq_len, d_model = x.shape
    n, d = m.heads, m.head_dim
    # SwitchGate
    gate_scores = F.softmax(m.router(x), dim=-1)
    _, top_k_indices = gate_scores.topk(n // 2, dim=-1)
    mask = torch.zeros_like(gate_scores).scatter_(2, top_k_indices, 1)
    masked = gate_scores * mask
    route_mat = masked / (masked.sum(0, keepdim=True) + epsilon) * int(capacity * batch_size)
    # preprocess
    route = route_mat.transpose(1, 2)  # (B, n, N)
    max_len = int(torch.max(torch.sum(route.reshape(-1, seq_len) > 0, dim=1)))
    route = route.transpose(0, 1)  # (n, B, N)
    _, seq_ids = torch.topk(route, max_len, dim=-1)
    seq_ids, _ = torch.sort(seq_ids, dim=2)
    xs = torch.stack([torch.stack([x[b, seq_ids[i, b]] for b in range(batch_size)]) for i in range(n)])
    # per-expert projections (W_q, W_kv), rotary at the compacted positions, causal softmax
    wq, wk, wv = (p.weight.view(n, d, d_model) for p in (m.q_proj, m.k_proj, m.v_proj))
    bq, bk, bv = (p.bias.view(n, 1, 1, d) for p in (m.q_proj, m.k_proj, m.v_proj))
    q = torch.einsum("ibtc,idc->ibtd", xs, wq) + bq
    k = torch.einsum("ibtc,idc->ibtd", xs, wk) + bk
    v = torch.einsum("ibtc,idc->ibtd", xs, wv) + bv
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(max_len, dtype=inv_freq.dtype), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    dot = q @ k.transpose(-2, -1) / math.sqrt(d)
    dot = dot.masked_fill(torch.ones(max_len, max_len, dtype=torch.bool).triu(1), float("-inf"))
    attn_out = dot.softmax(-1) @ v  # (n, B, L, d)
    # RowParallelLinearWithMoE: per-expert output projection and bias, scattered back
    wo = m.out_proj.weight.view(d_model, n, d).permute(1, 2, 0)  # (n, d, d_model)
    outputs = attn_out @ wo.unsqueeze(1) + m.head_bias.view(n, 1, 1, d_model)
    ids = seq_ids.unsqueeze(3).expand(outputs.shape)
    outs = torch.zeros_like(x)
    for i in range(n):
        outs = outs.scatter_add(1, ids[i], outputs[i])
    return outs


def per_head_loop(m: SelectiveMultiHeadAttention, x, causal):
    """The definition: per batch element and head, attention among the tokens that chose the head (in
    their order, RoPE at their ranks when the module has it), projected and added back at those tokens."""
    member = m.choices(x)
    d = m.head_dim
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for h in range(m.heads):
            chosen = member[b, :, h].nonzero().flatten()
            if len(chosen) == 0:
                continue
            xs = x[b, chosen]
            q, k, v = (p(xs)[:, h * d:(h + 1) * d] for p in (m.q_proj, m.k_proj, m.v_proj))
            if m.position is not None:
                q, k = (t[0, 0] for t in m.position(q[None, None], k[None, None]))
            logits = q @ k.T / math.sqrt(d)
            if causal:
                logits = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).triu(1), float("-inf"))
            y = logits.softmax(-1) @ v @ m.out_proj.weight[:, h * d:(h + 1) * d].T + m.head_bias[h]
            out[b, chosen] = out[b, chosen] + y
    return out


def _balanced(batch=2, tokens=12, dim=32, heads=4):
    """A module whose router sends each token to heads {0, 1} or {2, 3} by the sign of its channel 0,
    and inputs with half of each sequence of each sign: every head has tokens / 2 tokens (no filler)."""
    torch.manual_seed(0)
    m = SelectiveMultiHeadAttention(dim, heads, pattern=Causal(), position=RoPE(dim // heads)).double()
    with torch.no_grad():
        m.router.weight.normal_(0, 0.01)
        m.router.weight[:, 0] = torch.tensor([5.0, 4.0, -4.0, -5.0], dtype=torch.float64)
        m.head_bias.normal_()
    x = torch.randn(batch, tokens, dim, dtype=torch.float64) * 0.5
    signs = torch.stack([torch.randperm(tokens) % 2 * 2 - 1 for _ in range(batch)]).double()
    x[..., 0] = signs
    return m, x.requires_grad_()


def _trained_inputs(m):
    return [p for name, p in m.named_parameters() if not name.startswith("router")]


def test_smha_is_the_authors_v3_when_every_head_has_as_many_tokens_on_every_backend():
    m, x = _balanced()
    counts = m.choices(x).sum(1)
    assert bool((counts == x.shape[1] // 2).all())  # no filler: the released code is determined
    assert_backends_match(lambda backend: (setattr(m, "backend", backend), m(x))[1], authors_smha_v3(m, x),
                          [x, *_trained_inputs(m)], backends=BACKENDS)


@pytest.mark.parametrize("causal", [True, False])
def test_smha_is_attention_among_each_heads_tokens_on_every_backend(causal):
    torch.manual_seed(1)
    m = SelectiveMultiHeadAttention(32, 4, top_k=2, pattern=Causal() if causal else None,
                                    position=RoPE(8)).double()
    with torch.no_grad():
        m.head_bias.normal_()
    x = torch.randn(3, 10, 32, dtype=torch.float64, requires_grad=True)
    counts = m.choices(x).sum(1)
    assert counts.min() < counts.max()  # heads of unequal loads: the padded slots are masked
    assert_backends_match(lambda backend: (setattr(m, "backend", backend), m(x))[1], per_head_loop(m, x, causal),
                          [x, *_trained_inputs(m)], backends=BACKENDS)


def test_each_token_reads_only_the_heads_it_chose_and_the_router_gets_no_gradient():
    m, x = _balanced()
    assert not m.router.weight.requires_grad  # created frozen
    m.router.requires_grad_(True)
    y = m(x)
    y.square().sum().backward()
    assert m.router.weight.grad is None  # the router only selects, as in the released code
    # a token that chose heads {2, 3} is unchanged when heads 0 and 1 are zeroed
    low = x[0, :, 0] < 0
    with torch.no_grad():
        m.out_proj.weight[:, :16] = 0
        m.head_bias[:2] = 0
        torch.testing.assert_close(m(x)[0, low], y[0, low])
        assert not torch.allclose(m(x)[0, ~low], y[0, ~low])
    assert m.attention_flops(128) == 2 * 4 * 64 * 64 * 16  # half the tokens per head


def test_smha_trains_in_a_language_model():
    torch.manual_seed(0)
    model = TransformerLM(8, 32, 1, 4, max_len=16,
                          attention=lambda dim, heads, n: SelectiveMultiHeadAttention(dim, heads, pattern=Causal()))
    losses = copy_back_losses(model, 60)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5


def test_smha_errors():
    with pytest.raises(ShapeError, match="kv_heads"):
        SelectiveMultiHeadAttention(32, 4, kv_heads=2)
    with pytest.raises(ShapeError, match="top_k"):
        SelectiveMultiHeadAttention(32, 4, top_k=5)
    with pytest.raises(ShapeError, match="score"):
        SelectiveMultiHeadAttention(32, 4, score=RoPE(8))
    with pytest.raises(ShapeError, match="full or causal"):
        SelectiveMultiHeadAttention(32, 4, pattern=SlidingWindow(2, 0))(torch.randn(1, 8, 32))
    with pytest.raises(ShapeError, match="context"):
        SelectiveMultiHeadAttention(32, 4)(torch.randn(1, 8, 32), torch.randn(1, 8, 32))
