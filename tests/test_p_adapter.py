"""p-adapter against a transcription of the authors' BertSelfAttention / BertSelfOutput (wuhy68/p-Adapter,
eff_blip/eff_modeling_blip.py): forward and gradients on every backend, both graphs; p = 2 is the plain
map with a self-loop; only the adapter trains (loss falls)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_backends_match, fit

from multihead.errors import ShapeError
from multihead.nn.p_adapter import PLaplacianAttention, adaptive_pool_matrix
from multihead.patterns import Causal

BACKENDS = ("reference", "sdpa", "blocksparse", "auto")


def authors_forward(m: PLaplacianAttention, x, context=None, causal=False):
    """The authors' self-attention (no relative positions, no dropout) and BertSelfOutput with the
    Laplacian adapter, on this module's parameters; the residual LayerNorm left out."""
    e = 1e-8
    h, C = m.heads, m.dim
    cross = context is not None
    ctx_in = context if cross else x
    mixed_query_layer, mixed_value_layer = m.q_proj(x), m.v_proj(ctx_in)

    def t(y):
        return y.view(*y.shape[:-1], h, -1).permute(0, 2, 1, 3)

    query_layer, key_layer, value_layer = t(mixed_query_layer), t(m.k_proj(ctx_in)), t(mixed_value_layer)
    attention_scores = query_layer @ key_layer.transpose(-1, -2) / math.sqrt(m.head_dim)
    if causal:
        n = attention_scores.shape[-1]
        attention_scores = attention_scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attention_probs = attention_scores.softmax(-1)
    context_layer = (attention_probs @ value_layer).permute(0, 2, 1, 3).reshape(x.shape[0], -1, h * m.head_dim)
    q_length = mixed_query_layer.size()[1]
    if cross:
        k_length = m.sample_len
        mixed_value_layer = F.adaptive_avg_pool2d(mixed_value_layer, (k_length, None))
        attention_probs = F.adaptive_avg_pool2d(attention_probs, (None, k_length))
        mixed_value_layer = torch.cat([mixed_query_layer, mixed_value_layer], -2)
        zq = torch.zeros(attention_probs.size()[:2] + (q_length, q_length), dtype=x.dtype)
        zk = torch.zeros(attention_probs.size()[:2] + (k_length, k_length), dtype=x.dtype)
        attention_probs = torch.cat([torch.cat([zq, attention_probs], -1),
                                     torch.cat([attention_probs.transpose(-1, -2), zk], -1)], -2)
    # BertSelfOutput.forward
    hidden_states = m.out_proj(context_layer)
    p = m.p[0]
    mu = 2 * m.mu0 + m.mu0 * torch.tanh(m.mu_logit[0])
    bs, n, _ = mixed_value_layer.shape
    Fe = m.adapter_in(m.out_proj(mixed_value_layer))
    Fe = Fe.view(bs, n, h, -1).permute(0, 2, 1, 3)
    A = attention_probs
    X = Fe.repeat(1, 1, n, 1).view(bs, h, n, n, -1)
    Y = X.transpose(2, 3)
    graph_grad = torch.pow(A + e, 0.5).unsqueeze(-1) * (X - Y)
    graph_grad = torch.pow(torch.norm(graph_grad + e, dim=-1), p - 2)
    A = A * graph_grad
    alpha = 1 / (torch.sum(A, dim=-1, keepdim=True).squeeze(-1) + 2 * mu / p)
    alpha = torch.diag_embed(alpha)
    beta = alpha * (2 * mu / p)
    A = alpha @ A
    if n != q_length:
        A = A[:, :, :q_length, q_length:]
        beta = beta[:, :, :q_length, q_length:]
        Fe = A @ Fe[:, :, q_length:] + beta @ Fe[:, :, q_length:]
    else:
        Fe = A @ Fe + beta @ Fe
    Fe = Fe.permute(0, 2, 1, 3).reshape(bs, q_length, -1)
    Fe = m.adapter_out(F.gelu(m.adapter_gate(hidden_states)) * Fe)
    return hidden_states + Fe


def _module(**kw):
    torch.manual_seed(0)
    m = PLaplacianAttention(16, 2, reduction=2, **kw).double()
    with torch.no_grad():
        m.mu_logit.fill_(0.3)  # away from 0, so tanh's gradient is exercised
    return m


@pytest.mark.parametrize("causal", [False, True])
def test_values_graph_is_the_authors_self_attention_adapter_on_every_backend(causal):
    m = _module(pattern=Causal() if causal else None)
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)

    def run(backend):
        m.backend = backend
        return m(x)

    assert_backends_match(run, authors_forward(m, x, causal=causal), [x, *m.parameters()], backends=BACKENDS)


@pytest.mark.parametrize("p", [1.25, 3.0])
def test_bipartite_graph_is_the_authors_cross_attention_adapter_on_every_backend(p):
    m = _module(p=p, sample_len=5)  # 11 keys pooled to 5 overlapping windows
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)

    def run(backend):
        m.backend = backend
        return m(x, c)

    assert_backends_match(run, authors_forward(m, x, c), [x, c, *m.parameters()], backends=BACKENDS)


def test_p_two_is_the_plain_map_with_a_self_loop():
    m = _module(p=2.0, sample_len=None)
    x, c = torch.randn(1, 5, 16, dtype=torch.float64), torch.randn(1, 7, 16, dtype=torch.float64)
    q, k = (t.view(1, -1, 2, 8).transpose(1, 2) for t in (m.q_proj(x), m.k_proj(x)))
    a = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
    h = m.out_proj((a @ m.v_proj(x).view(1, -1, 2, 8).transpose(1, 2)).transpose(1, 2).reshape(1, 5, 16))
    f = m.features(m.v_proj(x))
    loop = (2 * m.mu() / 2).item()
    agg = ((a + loop * torch.eye(5, dtype=a.dtype)) / (1 + loop)) @ f
    want = h + m.adapter_out(F.gelu(m.adapter_gate(h)) * agg.transpose(1, 2).reshape(1, 5, 8))
    torch.testing.assert_close(m(x), want, atol=1e-7, rtol=1e-7)  # eps only perturbs the weights
    # bipartite, no pooling: A F_v / (1 + 2 mu / p), the self-loop only in the denominator
    q = m.q_proj(x).view(1, -1, 2, 8).transpose(1, 2)
    k, v = (t(c).view(1, -1, 2, 8).transpose(1, 2) for t in (m.k_proj, m.v_proj))
    a = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
    h = m.out_proj((a @ v).transpose(1, 2).reshape(1, 5, 16))
    agg = a @ m.features(m.v_proj(c)) / (1 + loop)
    want = h + m.adapter_out(F.gelu(m.adapter_gate(h)) * agg.transpose(1, 2).reshape(1, 5, 8))
    torch.testing.assert_close(m(x, c), want, atol=1e-7, rtol=1e-7)


def test_pool_matrix_is_adaptive_avg_pool():
    v = torch.randn(2, 11, 4, dtype=torch.float64)
    torch.testing.assert_close(adaptive_pool_matrix(11, 5, dtype=torch.float64).t() @ v,
                               F.adaptive_avg_pool2d(v, (5, None)))


def test_only_the_adapter_trains_and_the_loss_falls():
    """The paper's use: the attention frozen, the adapter (W_in, W_gate, W_out, p, mu) tuned to match a
    teacher whose adapter differs."""
    torch.manual_seed(0)
    teacher, student = PLaplacianAttention(32, 4, reduction=4), PLaplacianAttention(32, 4, reduction=4)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(("adapter", "p", "mu"))}
    student.load_state_dict(state, strict=False)
    with torch.no_grad():
        teacher.p.fill_(1.6)
        for layer in (teacher.adapter_in, teacher.adapter_gate, teacher.adapter_out):
            layer.weight.mul_(3.0)
    adapter = [p for name, p in student.named_parameters() if name.startswith(("adapter", "p", "mu"))]
    for p in student.parameters():
        p.requires_grad_(any(p is a for a in adapter))
    x, c = torch.randn(8, 12, 32), torch.randn(8, 20, 32)
    with torch.no_grad():
        want_self, want_cross = teacher(x), teacher(x, c)

    def loss():
        return F.mse_loss(student(x), want_self) + F.mse_loss(student(x, c), want_cross)

    losses = fit(loss, adapter, steps=80, lr=1e-2)
    assert losses[-1] < 0.3 * losses[0]
    assert student.p.item() != 1.25 and student.q_proj.weight.grad is None


def test_p_adapter_errors():
    with pytest.raises(ShapeError, match="kv_heads"):
        PLaplacianAttention(16, 2, kv_heads=1)
    with pytest.raises(ShapeError, match="reduction"):
        PLaplacianAttention(16, 4, reduction=8)  # width 2 over 4 heads
    with pytest.raises(ShapeError, match="graph"):
        PLaplacianAttention(16, 2, graph="full")
    with pytest.raises(ShapeError, match="dropout"):
        PLaplacianAttention(16, 2, dropout=0.1)
    with pytest.raises(ShapeError, match="p must"):
        PLaplacianAttention(16, 2, p=0)
    with pytest.raises(ShapeError, match="sample_len"):
        PLaplacianAttention(16, 2)(torch.randn(1, 4, 16), torch.randn(1, 8, 16))  # 16 > 8 keys
    with pytest.raises(ShapeError, match="context"):
        PLaplacianAttention(16, 2, graph="values")(torch.randn(1, 4, 16), torch.randn(1, 8, 16))
    m = PLaplacianAttention(16, 2)
    with torch.no_grad():
        m.p.fill_(-0.5)
    with pytest.raises(ShapeError, match="positive"):
        m(torch.randn(1, 4, 16))
