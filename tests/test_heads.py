"""Head topologies: each reduces to multi-head attention where its paper's degenerate setting says it
should (forward and gradients, float64), its own invariants hold, and the talking-heads hook
(``head_mix``) is served by the reference only."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multihead as mh
from multihead.backends import BACKENDS, Backend
from multihead.backends.base import HEAD_MIX_REFUSAL
from multihead.errors import BackendError, PatternError, ShapeError
from multihead.heads import (CompressedAttention, GroupedQueryAttention, LatentCache, LowRankAttention,
                             MixtureOfHeads, MultiHeadLatentAttention, MultiQueryAttention, SingleHeadAttention,
                             SparseQueryAttention, TalkingHeadsAttention, Topology)
from multihead.nn import MultiHeadAttention
from multihead.patterns import Causal, Routing, SlidingWindow
from multihead.request import make_request
from multihead.scores import ALiBi, RoPE

B, L, DIM, H = 2, 11, 24, 4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run(module, x, dout, **kwargs):
    """Output, input gradient and parameter gradients of ``module(x)`` against ``dout``."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x, **kwargs)
    out.backward(dout)
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def assert_same(a, b, names=None):
    """Equal outputs, input gradients, and gradients of the parameters both have (or ``names``)."""
    out_a, dx_a, g_a = a
    out_b, dx_b, g_b = b
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(dx_a, dx_b)
    names = sorted(set(g_a) & set(g_b)) if names is None else names
    assert names
    for n in names:
        torch.testing.assert_close(g_a[n], g_b[n], msg=n)


def inputs(dim=DIM, tokens=L):
    x = torch.randn(B, tokens, dim, dtype=torch.float64)
    return x, torch.randn(B, tokens, dim, dtype=torch.float64)


def proj_names(module):
    return [f"{p}.{w}" for p in PROJECTIONS for w in ("weight", "bias") if getattr(getattr(module, p), w) is not None]


# -- the shared base -------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [H, 2, 1])
def test_topology_base_is_multi_head_attention(kv_heads):
    mha = MultiHeadAttention(DIM, H, kv_heads, pattern=Causal(), position=RoPE(DIM // H)).double()
    topo = Topology(DIM, H, kv_heads, pattern=Causal(), position=RoPE(DIM // H)).double()
    topo.load_state_dict(mha.state_dict())
    x, dout = inputs()
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, -3:] = True
    assert_same(run(topo, x, dout, key_padding_mask=padding), run(mha, x, dout, key_padding_mask=padding))
    _, w_topo = topo(x, need_weights=True)
    _, w_mha = mha(x, need_weights=True)
    torch.testing.assert_close(w_topo, w_mha)


def test_gqa_from_mha_mean_pools_key_value_heads():
    mha = MultiHeadAttention(DIM, H).double()
    with torch.no_grad():  # make the heads of each pair identical: pooling then loses nothing
        for proj in (mha.k_proj, mha.v_proj):
            w = proj.weight.view(2, 2, DIM // H, DIM)
            w[:, 1] = w[:, 0]
            b = proj.bias.view(2, 2, DIM // H)
            b[:, 1] = b[:, 0]
    gqa = GroupedQueryAttention.from_mha(mha, kv_heads=2)
    assert gqa.kv_heads == 2 and gqa.k_proj.out_features == 2 * DIM // H
    x, dout = inputs()
    torch.testing.assert_close(gqa(x), mha(x))
    mqa = MultiQueryAttention.from_mha(mha)
    torch.testing.assert_close(mqa.k_proj.weight, mha.k_proj.weight.view(H, DIM // H, DIM).mean(0))
    assert mqa.kv_cache_elements() * H == mha.kv_heads * 2 * (DIM // H)


# -- mixture of heads -----------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [0, 1, 2, H])
def test_moh_with_every_head_on_and_equal_weights_is_mha(shared):
    mha = MultiHeadAttention(DIM, H, 2, pattern=Causal()).double()
    moh = MixtureOfHeads.from_mha(mha, shared_heads=shared, top_k=H - shared if shared < H else None)
    x, dout = inputs()
    assert_same(run(moh, x, dout), run(mha, x, dout), proj_names(mha))
    assert moh.active_fraction == 1.0
    torch.testing.assert_close(moh.head_usage, torch.ones(H))
    # Balanced routing: E * sum_i f_i P_i with f_i = 1 (every routed head picked), P_i = 1 / E.
    assert moh.aux_loss.item() == pytest.approx(float(H - shared))


def test_moh_routes_top_k_per_token_with_two_stage_weights():
    moh = MixtureOfHeads(DIM, 8, shared_heads=2, top_k=3).double()
    x = torch.randn(B, L, DIM, dtype=torch.float64)
    gates, aux = moh.gates(x)
    active = gates != 0
    assert (active.sum(-1) == 5).all() and active[..., :2].all()
    # Stage 2: shared gates sum to 2 * a_1 * ... ; routed gates of a token sum to top_k * a_2 * 2.
    alpha = torch.softmax(moh.balance(x), -1) * 2
    torch.testing.assert_close(gates[..., :2].sum(-1), 2 * alpha[..., 0])
    torch.testing.assert_close(gates[..., 2:].sum(-1), 3 * alpha[..., 1])
    y = moh(x)
    assert y.shape == x.shape and moh.active_fraction == pytest.approx(5 / 8)
    assert moh.head_usage.shape == (8,) and moh.head_usage.sum().item() == pytest.approx(5.0)
    moh.aux_loss.backward()
    assert moh.router.weight.grad.abs().sum() > 0
    assert moh.active_attention_flops(64) * 8 == moh.attention_flops(64) * 5


def test_moh_rejects_bad_head_counts():
    with pytest.raises(ShapeError, match="shared_heads"):
        MixtureOfHeads(DIM, H, shared_heads=5)
    with pytest.raises(ShapeError, match="top_k"):
        MixtureOfHeads(DIM, H, shared_heads=1, top_k=4)


# -- sparse query ---------------------------------------------------------------------------------

def test_sqa_with_as_many_query_heads_as_heads_is_mha():
    mha = MultiHeadAttention(DIM, H, 2, pattern=Causal()).double()
    sqa = SparseQueryAttention(DIM, H, query_heads=H, kv_heads=2, pattern=Causal()).double()
    sqa.load_state_dict(mha.state_dict())
    x, dout = inputs()
    assert_same(run(sqa, x, dout), run(mha, x, dout))


@pytest.mark.parametrize("heads,query_heads,kv_heads", [(8, 4, 2), (8, 2, 1), (8, 4, 4), (16, 4, 2)])
def test_sqa_flops_fall_with_the_query_heads(heads, query_heads, kv_heads):
    dim, n = 128, 96
    mha = GroupedQueryAttention(dim, heads, kv_heads)
    sqa = SparseQueryAttention(dim, heads, query_heads=query_heads, kv_heads=kv_heads)
    d = dim // heads
    assert sqa.head_dim == d and sqa.out_proj.in_features == query_heads * d
    assert sqa.attention_flops(n) == 4 * query_heads * n * n * d
    assert sqa.attention_flops(n) * heads == mha.attention_flops(n) * query_heads
    # Parameters: q and out projections shrink by query_heads / heads, k and v are those of GQA.
    q_out = 2 * dim * query_heads * d + query_heads * d + dim
    kv = 2 * (dim * kv_heads * d + kv_heads * d)
    assert sqa.parameter_count() == q_out + kv
    x = torch.randn(2, 10, dim)
    assert sqa(x).shape == x.shape


def test_sqa_needs_kv_heads_at_most_query_heads():
    with pytest.raises(ShapeError, match="kv_heads <= query_heads"):
        SparseQueryAttention(DIM, H, query_heads=2, kv_heads=4)


# -- multi-head latent attention ------------------------------------------------------------------

def _mla(**kw):
    return MultiHeadLatentAttention(DIM, H, pattern=Causal(), **kw).double()


@pytest.mark.parametrize("options", [{}, {"q_rank": 12, "kv_rank": 10, "rope_dim": 4, "v_head_dim": 5},
                                     {"latent_norm": False, "score": ALiBi(H)}])
def test_mla_absorbed_equals_naive(options):
    mla = _mla(**options)
    x, dout = inputs()
    naive = run(mla, x, dout, absorbed=False)
    absorbed = run(mla, x, dout, absorbed=True)
    assert_same(absorbed, naive, sorted(naive[2]))
    _, w_naive = mla(x, need_weights=True, absorbed=False)
    _, w_abs = mla(x, need_weights=True, absorbed=True)
    torch.testing.assert_close(w_abs, w_naive)


@settings(max_examples=12, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 6), rope_half=st.integers(1, 3),
       kv_rank=st.integers(1, 9), q_rank=st.one_of(st.none(), st.integers(1, 9)), v_head_dim=st.integers(1, 5),
       tokens=st.integers(1, 9), window=st.integers(0, 3))
def test_mla_absorbed_equals_naive_for_any_sizes(heads, head_dim, rope_half, kv_rank, q_rank, v_head_dim,
                                                 tokens, window):
    torch.manual_seed(1)
    pattern = SlidingWindow(window, 0) if window < tokens - 1 else Causal()
    mla = MultiHeadLatentAttention(8, heads, head_dim, kv_rank=kv_rank, q_rank=q_rank, rope_dim=2 * rope_half,
                                   v_head_dim=v_head_dim, pattern=pattern).double()
    x = torch.randn(2, tokens, 8, dtype=torch.float64)
    torch.testing.assert_close(mla(x, absorbed=True), mla(x, absorbed=False))


def test_mla_cached_decoding_equals_full_recompute():
    mla = _mla(q_rank=12)
    x, dout = inputs()
    full = run(mla, x, dout)  # naive form, all tokens at once
    mla.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    cache = LatentCache()
    chunks = [mla(xi[:, :5], cache=cache), mla(xi[:, 5:8], cache=cache)]  # prefill, then a chunk
    chunks += [mla(xi[:, t:t + 1], cache=cache) for t in range(8, L)]       # then token by token
    out = torch.cat(chunks, dim=1)
    out.backward(dout)
    grads = {n: p.grad for n, p in mla.named_parameters()}
    assert_same((out.detach(), xi.grad, grads), full, sorted(full[2]))
    assert len(cache) == L and cache.latent.shape == (B, L, mla.kv_rank)
    assert cache.bytes() == B * L * mla.kv_cache_bytes(torch.float64)


def test_mla_cache_is_the_latent_and_the_rotary_key():
    head_dim = 64
    mla = MultiHeadLatentAttention(512, 8)  # DeepSeek-V2 ratios: kv_rank = 4 d_h, rope_dim = d_h / 2
    assert (mla.kv_rank, mla.rope_dim) == (4 * head_dim, head_dim // 2)
    assert mla.kv_cache_elements() == 4 * head_dim + head_dim // 2
    mha = GroupedQueryAttention(512, 8, 8)
    assert mha.kv_cache_elements() == 2 * 8 * head_dim
    # the paper's comparison: MLA caches as much as GQA with 2.25 groups
    assert mla.kv_cache_bytes() / mha.kv_cache_bytes() == pytest.approx(2.25 / 8)
    mla = MultiHeadLatentAttention(512, 8, kv_rank=128, rope_dim=16)
    assert mla.kv_cache_bytes(torch.float32) == (128 + 16) * 4


# -- compressed convolutional attention ---------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [H, 2])
def test_cca_without_compression_is_mha(kv_heads):
    mha = MultiHeadAttention(DIM, H, kv_heads, pattern=Causal()).double()
    cca = CompressedAttention(DIM, H, kv_heads, compression=1, conv_kernel=0, qk_mean=False,
                              pattern=Causal()).double()
    cca.load_state_dict(mha.state_dict())
    x, dout = inputs()
    assert_same(run(cca, x, dout), run(mha, x, dout))


def test_cca_convolutions_start_as_the_identity_and_are_causal():
    plain = CompressedAttention(DIM, H, 2, compression=2, conv_kernel=0, qk_mean=False).double()
    conv = CompressedAttention(DIM, H, 2, compression=2, conv_kernel=3, qk_mean=False).double()
    conv.load_state_dict(plain.state_dict(), strict=False)
    x, _ = inputs()
    torch.testing.assert_close(conv(x), plain(x))
    with torch.no_grad():
        for p in conv.q_conv.parameters():
            p.normal_()
    q = conv.q_proj(x)
    mixed, _ = conv.mix_qk(q, conv.k_proj(x))
    q2 = q.clone()
    q2[:, 6:] += 1.0  # changing later tokens leaves earlier ones alone
    mixed2, _ = conv.mix_qk(q2, conv.k_proj(x))
    torch.testing.assert_close(mixed2[:, :6], mixed[:, :6])
    assert not torch.allclose(mixed2[:, 6:], mixed[:, 6:])


def test_cca_qk_mean_adds_the_mean_of_q_and_k():
    cca = CompressedAttention(DIM, H, compression=2, conv_kernel=0, qk_mean=True).double()
    q, k = torch.randn(2, B, L, DIM // 2, dtype=torch.float64)
    mq, mk = cca.mix_qk(q, k)
    torch.testing.assert_close(mq, q + (q + k) / 2)
    torch.testing.assert_close(mk, k + (q + k) / 2)
    grouped = CompressedAttention(DIM, H, 1, compression=2, conv_kernel=0, qk_mean=True).double()
    k1 = torch.randn(B, L, DIM // 2 // H, dtype=torch.float64)
    mq, mk = grouped.mix_qk(q, k1)
    qh = q.view(B, L, H, -1)
    torch.testing.assert_close(mq, (qh + (qh + k1.unsqueeze(2)) / 2).reshape_as(q))
    torch.testing.assert_close(mk, k1 + (qh.mean(2) + k1) / 2)


@pytest.mark.parametrize("compression", [2, 4])
def test_cca_shrinks_parameters_flops_and_cache_by_the_compression(compression):
    dim, heads, n = 256, 4, 64
    mha = GroupedQueryAttention(dim, heads, heads, bias=False)
    cca = CompressedAttention(dim, heads, compression=compression, conv_kernel=0, qk_mean=False, bias=False)
    assert cca.parameter_count() * compression == mha.parameter_count()
    assert cca.attention_flops(n) * compression == mha.attention_flops(n)
    assert cca.kv_cache_bytes() * compression == mha.kv_cache_bytes()
    ccgqa = CompressedAttention(dim, heads, 2, compression=compression)
    assert ccgqa.kv_cache_bytes() * compression * 2 == mha.kv_cache_bytes()


# -- talking heads --------------------------------------------------------------------------------

def test_talking_heads_with_identity_mixing_is_mha():
    mha = MultiHeadAttention(DIM, H, pattern=Causal()).double()
    th = TalkingHeadsAttention(DIM, H, pattern=Causal()).double()
    th.load_state_dict(mha.state_dict(), strict=False)
    x, dout = inputs()
    assert_same(run(th, x, dout), run(mha, x, dout), proj_names(mha))


def test_head_mix_follows_the_paper():
    q, k, v = (torch.randn(B, H, L, 8, dtype=torch.float64) for _ in range(3))
    pre, post = torch.randn(2, H, H, dtype=torch.float64)
    pattern = SlidingWindow(3, 0)
    out, weights = mh.attention(q, k, v, pattern=pattern, head_mix=(pre, post), return_weights=True)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / 8 ** 0.5
    logits = torch.einsum("bhqk,hg->bgqk", logits, pre)
    logits = logits.masked_fill(~pattern.dense_mask(L, L), float("-inf"))
    mixed = torch.einsum("bhqk,hg->bgqk", logits.softmax(-1), post)
    torch.testing.assert_close(weights, mixed)
    torch.testing.assert_close(out, mixed @ v)
    only_pre = mh.attention(q, k, v, head_mix=(pre, None))
    assert only_pre.shape == out.shape


def test_head_mix_is_refused_by_every_backend_that_does_not_declare_it():
    q = k = v = torch.randn(1, H, 8, 4)
    mix = (torch.eye(H), None)
    req = make_request(q, k, v, head_mix=mix)
    for name, backend in BACKENDS.items():
        why = backend.unsupported(req)
        assert (why is None) == backend.supports_head_mix, name
        if not backend.supports_head_mix:
            assert why == HEAD_MIX_REFUSAL
    with pytest.raises(BackendError, match="mixes the logits of all heads"):
        mh.attention(q, k, v, head_mix=mix, backend="sdpa")

    class Permissive(Backend):  # a future backend that says nothing about head_mix
        name = "permissive"

        def limits(self, req):
            return None

    assert Permissive().unsupported(req) == HEAD_MIX_REFUSAL
    assert Permissive().unsupported(make_request(q, k, v)) is None
    assert mh.explain(q, k, v, head_mix=mix, show=False).backend == "reference"


def test_head_mix_is_checked():
    q = k = v = torch.randn(1, H, 8, 4)
    with pytest.raises(ShapeError, match="pair"):
        mh.attention(q, k, v, head_mix=torch.eye(H))
    with pytest.raises(ShapeError, match=r"\(4, 4\)"):
        mh.attention(q, k, v, head_mix=(torch.eye(3), None))
    with pytest.raises(PatternError, match="head_mix"):
        mh.attention(q, k, v, pattern=Routing(2), head_mix=(torch.eye(H), None))


# -- low-rank compact attention --------------------------------------------------------------------

def test_low_rank_pooling_is_the_factorised_bilinear_attention():
    lama = LowRankAttention(DIM, H, rank=3).double()
    x, _ = inputs()
    pooled, weights = lama(x, need_weights=True)
    assert pooled.shape == (B, H, DIM) and weights.shape == (B, H, 1, L)
    p, q = lama.affinity_factors()
    w = p @ q.transpose(1, 2)  # W_j = P_j Q_j^T, rank 3
    assert torch.linalg.matrix_rank(w[0]).item() == 3
    scores = torch.einsum("d,hde,bte->bht", lama.context, w, x) / 3 ** 0.5
    expected = torch.einsum("bht,btd->bhd", scores.softmax(-1), x)
    torch.testing.assert_close(pooled, expected)


def test_low_rank_per_token_form_under_full_pattern_broadcasts_the_pooling():
    lama = LowRankAttention(DIM, H, per_token=True).double()
    x, _ = inputs()
    pooled = LowRankAttention.forward(_as_pooling(lama), x)
    expected = lama.out_proj(pooled.flatten(1)).unsqueeze(1).expand(B, L, DIM)
    torch.testing.assert_close(lama(x), expected)


def _as_pooling(module):
    clone = LowRankAttention(module.dim, module.heads, module.rank).double()
    clone.load_state_dict(module.state_dict(), strict=False)
    return clone


# -- single head ---------------------------------------------------------------------------------

def test_single_head_attends_over_the_partial_channels_only():
    shsa = SingleHeadAttention(DIM, partial_dim=6, qk_dim=4).double()
    x, _ = inputs()
    y, weights = shsa(x, need_weights=True)
    assert weights.shape == (B, 1, L, L)
    x2 = x.clone()
    x2[..., 6:] = torch.randn_like(x2[..., 6:])  # the passed-through channels do not steer attention
    _, weights2 = shsa(x2, need_weights=True)
    torch.testing.assert_close(weights2, weights)
    # The paper's SHSA written out: GroupNorm(1) over (channels, tokens), one head, ReLU + projection.
    part = x[..., :6]
    normed = (part - part.mean((1, 2), keepdim=True)) / (part.var((1, 2), unbiased=False, keepdim=True)
                                                         + shsa.norm.eps).sqrt()
    normed = normed * shsa.norm.weight + shsa.norm.bias
    q, k, v = shsa.qkv(normed).split([4, 4, 6], -1)
    attended = torch.softmax(q @ k.transpose(1, 2) / 2, -1) @ v
    expected = shsa.proj(torch.cat([attended, x[..., 6:]], -1))
    torch.testing.assert_close(y, expected)
