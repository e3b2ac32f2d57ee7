"""TPLA (tensor-parallel latent attention) against a transcription of its formula (forward and
gradients, every backend), its reductions to MLA, cached prefill + decoding, 2 gloo ranks against
one process, training, errors."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.distributed as dist
from conftest import assert_backends_match, copy_back_losses, on_backend
from torch import nn

from multihead.errors import ShapeError
from multihead.heads import MultiHeadLatentAttention
from multihead.heads.tpla import TensorParallelLatentAttention, hadamard, pca_basis
from multihead.models import TransformerLM
from multihead.patterns import Causal

BACKENDS = ("reference", "sdpa", "blocksparse", "auto")


def tpla_formula(mla: MultiHeadLatentAttention, x, shards: int, U=None, rope="replicate"):
    """TPLA written out per shard and per head, causal, with ``mla``'s weights: on shard ``j`` head
    ``i`` scores key ``t`` with ``scale * (q~_i^(j) . c'_t^(j) + q^R_i . k^R_t)`` (the rotary part whole
    or its ``j``-th slice), takes its own softmax, reads ``sum_t p_t c'_t^(j)``, and maps it through
    the ``j``-th column block of ``W_UV U``; the shards' outputs through ``W_O`` are summed."""
    B, L, _ = x.shape
    H, d, R, r = mla.heads, mla.head_dim, mla.rope_dim, mla.kv_rank
    U = torch.eye(r, dtype=x.dtype) if U is None else U
    pos = torch.arange(L)
    q = mla.q_proj(x).view(B, L, H, d + R)
    qc, qr = q[..., :d], q[..., d:]
    qr = mla.rope.rotate(qr.transpose(1, 2), pos)  # (B, H, L, R)
    down = mla.kv_down(x)
    c = mla.kv_norm(down[..., :r]) @ U  # (B, L, r): the latent in the transformed basis
    kr = mla.rope.rotate(down[..., r:].unsqueeze(1), pos)[:, 0]  # (B, L, R)
    w = mla.kv_up.weight.view(H, d + mla.v_head_dim, r)
    w_uk, w_uv = w[:, :d], w[:, d:] @ U
    w_o = mla.out_proj.weight.view(mla.dim, H, mla.v_head_dim)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    n, m = r // shards, (R // shards if rope == "split" else R)
    y = torch.zeros(B, L, mla.dim, dtype=x.dtype)
    for j in range(shards):
        cj = c[..., j * n:(j + 1) * n]
        rj = slice(j * m, (j + 1) * m) if rope == "split" else slice(None)
        for i in range(H):
            q_abs = (qc[:, :, i] @ w_uk[i]) @ U  # (B, L, r)
            logits = q_abs[..., j * n:(j + 1) * n] @ cj.transpose(1, 2) + qr[:, i][..., rj] @ kr[..., rj].transpose(1, 2)
            p = (logits * mla.scale).masked_fill(~causal, float("-inf")).softmax(-1)
            head = (p @ cj) @ w_uv[i][:, j * n:(j + 1) * n].T  # (B, L, v_head_dim)
            y = y + head @ w_o[:, i].T
    return y


def _mla(dim=32, heads=4, seed=0, **kw):
    torch.manual_seed(seed)
    return MultiHeadLatentAttention(dim, heads, pattern=Causal(), **kw).double()


@pytest.mark.parametrize("shards,transform,rope", [(2, None, "replicate"), (4, "hadamard", "replicate"),
                                                    (2, "hadamard", "split")])
def test_tpla_is_its_formula_on_every_backend(shards, transform, rope):
    mla = _mla()
    m = TensorParallelLatentAttention(mla, shards, transform=transform, rope=rope)
    x = torch.randn(2, 11, 32, dtype=torch.float64, requires_grad=True)
    U = None if transform is None else hadamard(mla.kv_rank, torch.float64)
    assert_backends_match(on_backend(m, x), tpla_formula(mla, x, shards, U, rope), [x, *m.parameters()],
                          backends=BACKENDS)


def test_one_shard_is_mla_and_the_transform_leaves_mla_unchanged():
    mla = _mla()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(mla.kv_rank, mla.kv_rank, dtype=torch.float64))
    for transform in (None, "hadamard", pca_basis(mla, x), q):
        torch.testing.assert_close(TensorParallelLatentAttention(mla, 1, transform=transform)(x), mla(x))
    # with two shards the per-shard softmax changes the output, and so does the basis it is cut in
    plain, rotated = (TensorParallelLatentAttention(mla, 2, transform=t)(x) for t in (None, "hadamard"))
    assert (plain - mla(x)).abs().max() > 1e-2 and (plain - rotated).abs().max() > 1e-2


def test_pca_basis_is_orthogonal_and_orders_the_variance():
    mla = _mla()
    x = torch.randn(4, 16, 32, dtype=torch.float64)
    U = pca_basis(mla, x)
    torch.testing.assert_close(U.T @ U, torch.eye(mla.kv_rank, dtype=torch.float64))
    latent = mla.kv_norm(mla.kv_down(x)[..., : mla.kv_rank]).reshape(-1, mla.kv_rank) @ U
    var = latent.var(0)
    assert torch.all(var[:-1] >= var[1:] - 1e-9)
    torch.testing.assert_close(hadamard(8).T @ hadamard(8), torch.eye(8))


def test_prefill_is_mla_and_decoding_is_tpla_from_the_sharded_cache():
    mla = _mla()
    m = TensorParallelLatentAttention(mla, 2, transform="hadamard")
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    cache = m.new_cache()
    with torch.no_grad():
        prefill = m(x[:, :7], cache=cache)
        steps = [m(x[:, t:t + 1], cache=cache) for t in range(7, 12)]
        full = m(x)
    torch.testing.assert_close(prefill, mla(x[:, :7]))
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 7:])
    assert cache.k.shape[1:] == (2, 12, mla.kv_rank // 2 + mla.rope_dim)  # the shards as key/value heads
    assert m.kv_cache_elements() == mla.kv_rank // 2 + mla.rope_dim < mla.kv_cache_elements()
    # mla_prefill=False: the prompt too runs the TPLA form
    late = TensorParallelLatentAttention(mla, 2, transform="hadamard", mla_prefill=False)
    with torch.no_grad():
        torch.testing.assert_close(late(x[:, :7], cache=late.new_cache()), full[:, :7])


def _rank_run(rank, world, state, x, dy):
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(32, 4, pattern=Causal()).double()
    mla.load_state_dict(state)
    m = TensorParallelLatentAttention(mla, world, transform="hadamard", group=dist.group.WORLD)
    x = x.clone().requires_grad_(True)
    y = m(x)
    y.backward(dy)
    cache = m.new_cache()
    with torch.no_grad():
        decoded = torch.cat([m(x[:, :6], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(6, x.shape[1])], 1)
    return {"y": y.detach(), "dx": x.grad, "dw": mla.kv_up.weight.grad, "decoded": decoded,
            "cache_width": cache.k.shape[1:]}


@pytest.mark.skipif(not dist.is_available() or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs torch.distributed and fork")
def test_two_gloo_ranks_equal_the_single_process_form():
    from multihead.distributed import run_local

    mla = _mla()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    dy = torch.randn(2, 10, 32, dtype=torch.float64)
    results = run_local(2, _rank_run, timeout=30.0, state=mla.state_dict(), x=x, dy=dy)
    for r in results:
        assert "raised" not in r, r
    single = TensorParallelLatentAttention(mla, 2, transform="hadamard")
    xs = x.clone().requires_grad_(True)
    y = single(xs)
    y.backward(dy)
    with torch.no_grad():
        cache = single.new_cache()
        decoded = torch.cat([single(x[:, :6], cache=cache)] + [single(x[:, t:t + 1], cache=cache) for t in range(6, 10)], 1)
    for r in results:  # every rank holds the all-reduced output
        torch.testing.assert_close(r["y"], y.detach())
        torch.testing.assert_close(r["decoded"], decoded)
        assert r["cache_width"] == (1, 10, mla.kv_rank // 2 + mla.rope_dim)  # one shard cached per rank
    # each rank's gradients are its shard's share; summed over the ranks they are the single process's
    torch.testing.assert_close(results[0]["dx"] + results[1]["dx"], xs.grad)
    torch.testing.assert_close(results[0]["dw"] + results[1]["dw"], mla.kv_up.weight.grad)


def test_tpla_trains_in_a_language_model():
    torch.manual_seed(0)
    model = TransformerLM(8, 32, 1, 4, max_len=16, attention=lambda dim, heads, n: TensorParallelLatentAttention(
        MultiHeadLatentAttention(dim, heads, pattern=Causal()), 2, transform="hadamard"))
    losses = copy_back_losses(model, 60)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:5]) / 5


def test_tpla_errors():
    mla = MultiHeadLatentAttention(32, 4, kv_rank=24)
    with pytest.raises(ShapeError, match="does not split into 5"):
        TensorParallelLatentAttention(mla, 5)
    with pytest.raises(ShapeError, match="power-of-two"):
        TensorParallelLatentAttention(mla, 2, transform="hadamard")
    with pytest.raises(ShapeError, match="not orthogonal"):
        TensorParallelLatentAttention(mla, 2, transform=torch.randn(24, 24))
    with pytest.raises(ShapeError, match="rope_dim"):
        TensorParallelLatentAttention(mla, 8, rope="split")  # rope_dim 4
    with pytest.raises(ShapeError, match="rope must be"):
        TensorParallelLatentAttention(mla, 2, rope="shared")
    with pytest.raises(ShapeError, match="wraps a MultiHeadLatentAttention"):
        TensorParallelLatentAttention(nn.Linear(4, 4), 2)
    with pytest.raises(ShapeError, match="shards must"):
        TensorParallelLatentAttention(mla, 0)
