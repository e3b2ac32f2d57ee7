"""TransNeXt's aggregated attention against a transcription of the authors' AggregatedAttention
(unfolded neighborhoods, forward and gradients, every backend), its pieces, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_backends_match, gratings_losses, on_backend

from multihead.errors import ShapeError
from multihead.models import VisionTransformer
from multihead.vision.aggregated import AggregatedAttention, pooled_offsets


def authors_cpb(query_size, key_size):
    """The authors' get_relative_position_cpb (unique offsets and their index)."""
    axis_qh, axis_qw = (torch.arange(n, dtype=torch.float32) for n in query_size)
    axis_kh = F.adaptive_avg_pool1d(axis_qh.unsqueeze(0), key_size[0]).squeeze(0)
    axis_kw = F.adaptive_avg_pool1d(axis_qw.unsqueeze(0), key_size[1]).squeeze(0)
    axis_kh, axis_kw = (a.reshape(-1) for a in torch.meshgrid(axis_kh, axis_kw, indexing="ij"))
    axis_qh, axis_qw = (a.reshape(-1) for a in torch.meshgrid(axis_qh, axis_qw, indexing="ij"))
    relative_h = (axis_qh[:, None] - axis_kh[None, :]) / (query_size[0] - 1) * 8
    relative_w = (axis_qw[:, None] - axis_kw[None, :]) / (query_size[1] - 1) * 8
    table, index = torch.unique(torch.stack([relative_h, relative_w], dim=-1).view(-1, 2), return_inverse=True, dim=0)
    table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / torch.log2(torch.tensor(8.0))
    return index, table


def authors_forward(m: AggregatedAttention, x):
    """The authors' AggregatedAttention.forward, with this module's parameters."""
    B, H, W, C = x.shape
    N, h, d, k = H * W, m.heads, m.head_dim, m.window
    tokens = x.reshape(B, N, C)
    ones = F.unfold(torch.ones(1, 1, H, W, dtype=x.dtype), k, padding=k // 2)
    local_len, padding_mask = ones.sum(-2).squeeze().unsqueeze(-1), ones.squeeze(0).permute(1, 0) == 0
    pool_h, pool_w = H // m.pool, W // m.pool
    pool_len = pool_h * pool_w
    q_norm = F.normalize(m.q_proj(tokens).reshape(B, N, h, d).permute(0, 2, 1, 3), dim=-1)
    q_norm_scaled = (q_norm + m.query_embedding) * F.softplus(m.temperature).view(h, 1, 1) * torch.log(
        local_len + pool_len)
    k_local, v_local = m.k_proj(tokens), m.v_proj(tokens)
    k_local = F.normalize(k_local.reshape(B, N, h, d), dim=-1).reshape(B, N, -1)
    kv_local = torch.cat([k_local, v_local], dim=-1).permute(0, 2, 1).reshape(B, -1, H, W)
    k_local, v_local = F.unfold(kv_local, k, padding=k // 2).reshape(
        B, 2 * h, d, k * k, N).permute(0, 1, 4, 2, 3).chunk(2, dim=1)
    # the authors' table is indexed by window position; ours by offset query - key (Swin's sign)
    relative_pos_bias_local = m.local_bias.bias_table.flip(-2, -1).reshape(h, k * k)
    attn_local = ((q_norm_scaled.unsqueeze(-2) @ k_local).squeeze(-2)
                  + relative_pos_bias_local.unsqueeze(1)).masked_fill(padding_mask, float("-inf"))
    x_ = x.permute(0, 3, 1, 2)
    x_ = F.adaptive_avg_pool2d(F.gelu(m.reduce(x_)), (pool_h, pool_w)).reshape(B, -1, pool_len).permute(0, 2, 1)
    x_ = m.pool_norm(x_)
    k_pool = m.k_proj(x_).reshape(B, pool_len, h, d).permute(0, 2, 1, 3)
    v_pool = m.v_proj(x_).reshape(B, pool_len, h, d).permute(0, 2, 1, 3)
    index, table = authors_cpb((H, W), (pool_h, pool_w))
    pool_bias = m.cpb(table.to(x.dtype)).transpose(0, 1)[:, index.view(-1)].view(-1, N, pool_len)
    attn_pool = q_norm_scaled @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + pool_bias
    attn = torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1)
    attn_local, attn_pool = torch.split(attn, [k * k, pool_len], dim=-1)
    x_local = (((q_norm @ m.learnable_tokens) + m.learnable_bias + attn_local).unsqueeze(-2)
               @ v_local.transpose(-2, -1)).squeeze(-2)
    out = (x_local + attn_pool @ v_pool).transpose(1, 2).reshape(B, N, C)
    return m.out_proj(out).view(B, H, W, C)


@pytest.mark.parametrize("window,pool,grid", [(3, 2, (6, 5)), (5, 3, (7, 6))])
def test_aggregated_attention_is_the_authors_formula_on_every_backend(window, pool, grid):
    torch.manual_seed(0)
    m = AggregatedAttention(16, 2, window=window, pool=pool, cpb_hidden=32).double()
    with torch.no_grad():  # move the zero / tiny initial tables so that every term is exercised
        m.learnable_bias.normal_()
        m.local_bias.bias_table.normal_()
    x = torch.randn(2, *grid, 16, dtype=torch.float64, requires_grad=True)
    assert_backends_match(on_backend(m, x), authors_forward(m, x), [x, *m.parameters()],
                          backends=("reference", "sdpa", "blocksparse", "auto"))


def test_pooled_offsets_are_the_authors_log_spaced_table():
    index, table = authors_cpb((5, 4), (2, 2))
    torch.testing.assert_close(pooled_offsets((5, 4), (2, 2)).reshape(-1, 2), table[index.view(-1)])


def test_edge_positions_see_fewer_neighbors_and_every_pooled_key():
    m = AggregatedAttention(8, 2, window=3, pool=2)
    counts = m.neighbor_counts((4, 5), "cpu").view(4, 5)
    assert counts[0, 0] == 4 and counts[0, 2] == 6 and counts[1, 1] == 9


def test_transnext_vit_trains():
    torch.manual_seed(0)
    model = VisionTransformer(16, 2, 32, 2, 4, attention="transnext", in_channels=1, num_classes=4)
    assert any(isinstance(m, AggregatedAttention) for m in model.modules())
    losses = gratings_losses(model, 40)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_aggregated_attention_errors():
    with pytest.raises(ShapeError, match="odd"):
        AggregatedAttention(16, 2, window=4)
    with pytest.raises(ShapeError, match="kv_heads"):
        AggregatedAttention(16, 4, kv_heads=2)
    with pytest.raises(ShapeError, match="channels-last"):
        AggregatedAttention(16, 2)(torch.randn(2, 16, 4, 4))
