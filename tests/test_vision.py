"""Each vision block equals a direct transcription of its paper's computation, forward and gradients.

The transcriptions below use the module's own weights but none of its patterns or scores: each
writes down which keys a query sees the way its paper does (Swin's cyclic shift and region mask,
NAT's clamped window start, CSWin's stripes, HaloNet's haloed blocks, ...), in float64 loops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multihead import catalog
from multihead.errors import MultiheadError
from multihead.models import TransformerBlock
from multihead.vision import (ChannelGroupAttention, CrossAttentionFusion, CrossShapedWindowAttention,
                              CrossViTAttention, HaloAttention, LocalGlobalAttention, MultiScaleHeadAttention, OnTokens,
                              NeighborhoodAttention2d, SparseGlobalAttention, WindowAttention, dlgsa_pair,
                              swin_pair)

# -- shared pieces of the transcriptions --------------------------------------------------------


def heads_of(module, x, which):
    """The projection ``which`` ('q', 'k', 'v') of map ``x`` as ``(B, heads, H, W, head_dim)``."""
    proj = getattr(module, f"{which}_proj")
    batch, rows, cols, _ = x.shape
    return proj(x).view(batch, rows, cols, -1, module.head_dim).permute(0, 3, 1, 2, 4)


def output_projection(module, out):
    """Per-head outputs ``(B, heads, H, W, head_dim)`` -> the module's output ``(B, H, W, dim)``."""
    batch, heads, rows, cols, d = out.shape
    return module.out_proj(out.permute(0, 2, 3, 1, 4).reshape(batch, rows, cols, heads * d))


def attend_to(q, keys, values, bias=None):
    """One query ``(d,)`` over its keys ``(n, d)``: ``softmax(q k^T / sqrt(d) + bias) v``."""
    logits = keys @ q / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=0) @ values


def per_query(module, x, keys_of, bias_of=None, heads=None):
    """Output of attention where query ``(y, x)`` of head ``h`` sees positions ``keys_of(h, y, x)``
    (a list of ``(ky, kx)``), with ``bias_of(h, y, x, ky, kx)`` added to each logit."""
    q, k, v = (heads_of(module, x, w) for w in "qkv")
    batch, count, rows, cols, _ = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(count if heads is None else heads):
            for y in range(rows):
                for xx in range(cols):
                    keys = keys_of(h, y, xx)
                    ky = torch.tensor([p[0] for p in keys])
                    kx = torch.tensor([p[1] for p in keys])
                    bias = None if bias_of is None else torch.stack([bias_of(h, y, xx, a, c) for a, c in keys])
                    out[b, h, y, xx] = attend_to(q[b, h, y, xx], k[b, h, ky, kx], v[b, h, ky, kx], bias)
    return out


def assert_same_forward_and_gradients(module, transcription, x, call=None):
    """``module(x)`` (or ``call(x)``) equals ``transcription(x)``, and so do the gradients of x and
    of every parameter."""
    x = x.clone().requires_grad_()
    ours = (call or module)(x)
    want = transcription(x)
    torch.testing.assert_close(ours, want, atol=1e-10, rtol=1e-9)
    grad = torch.randn_like(ours)
    params = [x] + [p for p in module.parameters()]
    g_ours = torch.autograd.grad(ours, params, grad, allow_unused=True)
    g_want = torch.autograd.grad(want, params, grad, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_ours, g_want)):
        assert (a is None) == (b is None), f"gradient {i}: one side has none"
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=f"gradient {i}")


def feature_map(rows, cols, dim=8, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, rows, cols, dim, generator=gen, dtype=torch.float64)


def randomize(module, seed=1):
    """Random weights everywhere (biases and tables included), so no term is vacuously zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


# -- Swin ---------------------------------------------------------------------------------------


def swin_transcription(module, x, window, shift):
    """Swin's algorithm: roll the map by ``-shift``, partition it into windows, attend inside each
    window with the bias ``B[dy + M - 1, dx + M - 1]`` and the shifted-window region mask, reverse."""
    q, k, v = (torch.roll(heads_of(module, x, w), (-shift, -shift), dims=(2, 3)) for w in "qkv")
    batch, heads, rows, cols, d = q.shape
    region = torch.zeros(rows, cols, dtype=torch.long)
    if shift:
        label = 0
        for ys in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for xs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                region[ys, xs] = label
                label += 1
    table = module.relative_bias.table()
    out = torch.zeros_like(q)
    ly, lx = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ly, lx = ly.flatten(), lx.flatten()
    for wy in range(rows // window):
        for wx in range(cols // window):
            ys, xs = slice(wy * window, (wy + 1) * window), slice(wx * window, (wx + 1) * window)
            qw, kw, vw = (t[:, :, ys, xs].reshape(batch, heads, -1, d) for t in (q, k, v))
            bias = table[:, (ly[:, None] - ly[None]) + window - 1, (lx[:, None] - lx[None]) + window - 1]
            labels = region[ys, xs].flatten()
            mask = torch.where(labels[:, None] == labels[None], 0.0, -100.0).to(x.dtype)  # Swin's -100
            weights = torch.softmax(qw @ kw.transpose(-2, -1) / math.sqrt(d) + bias + mask, dim=-1)
            out[:, :, ys, xs] = (weights @ vw).view(batch, heads, window, window, d)
    return output_projection(module, torch.roll(out, (shift, shift), dims=(2, 3)))


@pytest.mark.parametrize("relative_bias", ["table", "dynamic"], ids=["swin_table", "crossformer_dpb"])
@pytest.mark.parametrize("shift", [0, 2], ids=["regular", "shifted"])
def test_window_attention_is_swin(shift, relative_bias):
    module = randomize(WindowAttention(8, 2, window=4, shift=shift, relative_bias=relative_bias).double())
    assert_same_forward_and_gradients(module, lambda x: swin_transcription(module, x, 4, shift),
                                      feature_map(8, 12))


def test_swin_pair_alternates_regular_and_shifted_windows():
    pair = swin_pair(16, 2, window=4)
    assert [block.attention.shift for block in pair] == [(0, 0), (2, 2)]
    assert all(isinstance(block, TransformerBlock) for block in pair)
    x = torch.randn(2, 8, 8, 16)
    assert pair(x).shape == x.shape


def test_window_attention_on_a_map_smaller_than_the_window_is_one_window():
    module = WindowAttention(8, 2, window=7, shift=3)
    pattern = module.pattern_for((5, 9))
    assert pattern.window == (5, 7) and pattern.shift == (0, 3)


# -- NAT / DiNAT --------------------------------------------------------------------------------


def nat_keys(rows, cols, kernel, dilation):
    """NAT's neighborhood of ``(y, x)``: on each axis, inside the dilation sub-grid of the query,
    the ``kernel`` positions starting at ``clamp(i - kernel // 2, 0, L - kernel)``."""
    def axis(i, n):
        group, index = i % dilation, i // dilation
        length = len(range(group, n, dilation))
        start = min(max(index - kernel // 2, 0), length - kernel)
        return [group + (start + m) * dilation for m in range(kernel)]

    return lambda h, y, x: [(a, c) for a in axis(y, rows) for c in axis(x, cols)]


@pytest.mark.parametrize("dilation", [1, 2])
def test_neighborhood_attention_is_nat(dilation):
    module = randomize(NeighborhoodAttention2d(8, 2, kernel=3, dilation=dilation).double())
    table = module.relative_bias.bias_table

    def bias(h, y, x, ky, kx):  # NAT's relative position bias, in units of the dilation
        return table[h, (y - ky) // dilation + 2, (x - kx) // dilation + 2]

    def transcription(x):
        return output_projection(module, per_query(module, x, nat_keys(7, 8, 3, dilation), bias))

    assert_same_forward_and_gradients(module, transcription, feature_map(7, 8))


def test_crossformer_long_distance_attention_groups_positions_an_interval_apart():
    """CrossFormer's LDA with interval 3 on a 6 x 9 map: positions with the same ``(y % 3, x % 3)``
    form a group of 2 x 3 that attends within itself; the DPB sees offsets in units of 3."""
    module = randomize(catalog.long_distance(8, 2, (6, 9)).double())
    assert module.kernel == (2, 3) and module.dilation == (3, 3)
    table = module.relative_bias.table()

    def keys(h, y, x):
        return [(a, c) for a in range(6) for c in range(9) if a % 3 == y % 3 and c % 3 == x % 3]

    def bias(h, y, x, ky, kx):
        return table[h, (y - ky) // 3 + 1, (x - kx) // 3 + 2]

    assert_same_forward_and_gradients(
        module, lambda x: output_projection(module, per_query(module, x, keys, bias)), feature_map(6, 9))


def test_blocks_fit_their_windows_to_small_maps():
    nat = NeighborhoodAttention2d(8, 2, kernel=5, dilation=3)
    pattern = nat.pattern_for((4, 12))
    assert pattern.kernel == (4, 5) and pattern.dilation == (1, 2)
    assert CrossShapedWindowAttention(8, 2, stripe=7).pattern_for((3, 9)).stripe == 3
    assert HaloAttention(8, 2, block=8, halo=2).pattern_for((5, 9)).block == (5, 8)
    for module in (nat, CrossShapedWindowAttention(16, 4, 2, kv_heads=2), WindowAttention(16, 4, 7, kv_heads=1)):
        x = torch.randn(1, 4, 12, module.dim)
        assert module(x).shape == x.shape


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.filterwarnings("ignore:return_lse is deprecated")
@pytest.mark.parametrize("dilation", [1, 2])
def test_neighborhood_attention_equals_natten_na2d(dilation):
    """NATTEN's na2d on the module's own projections (NATTEN 0.21 has no relative bias term)."""
    natten = pytest.importorskip("natten")
    module = NeighborhoodAttention2d(64, 4, kernel=5, dilation=dilation, relative_bias=None).eval()
    x = torch.randn(2, 12, 11, 64)
    with torch.no_grad():
        q, k, v = (heads_of(module, x, w).permute(0, 2, 3, 1, 4).contiguous() for w in "qkv")
        theirs = natten.na2d(q, k, v, kernel_size=5, dilation=dilation)
        want = output_projection(module, theirs.permute(0, 3, 1, 2, 4))
        torch.testing.assert_close(module(x), want, atol=1e-5, rtol=1e-5)


# -- CSWin --------------------------------------------------------------------------------------


def test_cross_shaped_window_attention_is_cswin_with_lepe():
    module = randomize(CrossShapedWindowAttention(8, 4, stripe=2).double())
    rows, cols = 6, 5

    def keys(h, y, x):  # heads 0-1: the query's stripe of 2 rows; heads 2-3: its stripe of 2 columns
        if h < 2:
            return [(a, c) for a in range(rows) if a // 2 == y // 2 for c in range(cols)]
        return [(a, c) for a in range(rows) for c in range(cols) if c // 2 == x // 2]

    def transcription(x):
        v = heads_of(module, x, "v")
        batch, heads, _, _, d = v.shape
        values = v.permute(0, 1, 4, 2, 3).reshape(batch, heads * d, rows, cols)
        lepe = F.conv2d(values, module.lepe.weight, module.lepe.bias, padding=1, groups=heads * d)
        lepe = lepe.view(batch, heads, d, rows, cols).permute(0, 1, 3, 4, 2)
        return output_projection(module, per_query(module, x, keys) + lepe)

    assert_same_forward_and_gradients(module, transcription, feature_map(rows, cols))


def test_cswin_needs_an_even_number_of_heads():
    with pytest.raises(MultiheadError, match="heads=3 must be even"):
        CrossShapedWindowAttention(12, 3)


# -- HaloNet ------------------------------------------------------------------------------------


def test_halo_attention_is_halonet():
    module = randomize(HaloAttention(8, 2, block=3, halo=1).double())
    rows, cols = 7, 6
    table = module.relative_bias.bias_table  # offsets up to block + halo - 1 = 3: 7 entries per axis

    def keys(h, y, x):  # the query's 3x3 block grown by 1 on every side, cut at the map's edges
        y0, x0 = (y // 3) * 3, (x // 3) * 3
        return [(a, c) for a in range(max(y0 - 1, 0), min(y0 + 4, rows))
                for c in range(max(x0 - 1, 0), min(x0 + 4, cols))]

    def transcription(x):
        return output_projection(module, per_query(
            module, x, keys, lambda h, y, xx, ky, kx: table[h, y - ky + 3, xx - kx + 3]))

    assert_same_forward_and_gradients(module, transcription, feature_map(rows, cols))


# -- DaViT --------------------------------------------------------------------------------------


def test_channel_group_attention_is_davit():
    module = randomize(ChannelGroupAttention(8, 2).double())

    def transcription(x):
        tokens = x.flatten(1, 2)
        out = []
        for g in range(2):  # each group of C_g = 4 channels: channels are the tokens
            rows = slice(4 * g, 4 * (g + 1))
            q, k, v = (F.linear(tokens, p.weight[rows], p.bias[rows]) for p in
                       (module.q_proj, module.k_proj, module.v_proj))
            weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(4), dim=-1)  # (B, C_g, C_g)
            out.append((weights @ v.transpose(1, 2)).transpose(1, 2))
        return module.out_proj(torch.cat(out, dim=-1)).view(x.shape)

    assert_same_forward_and_gradients(module, transcription, feature_map(5, 6))


# -- MEDUSA-style multi-scale heads -------------------------------------------------------------


def pooled_map(x, scale):
    """Mean over each ``scale x scale`` cell, cells cut at the bottom/right edges."""
    batch, rows, cols, dim = x.shape
    out = x.new_zeros(batch, -(-rows // scale), -(-cols // scale), dim)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = x[:, i * scale:(i + 1) * scale, j * scale:(j + 1) * scale].mean(dim=(1, 2))
    return out


def test_multiscale_heads_see_pooled_key_value_pyramids():
    module = randomize(MultiScaleHeadAttention(8, 4, scales=(1, 2)).double())

    def transcription(x, per_scale=False):
        q = heads_of(module, x, "q")
        outs = []
        for g, scale in enumerate((1, 2)):  # heads 2g, 2g + 1 see the map pooled by `scale`
            pooled = pooled_map(x, scale)
            k, v = heads_of(module, pooled, "k"), heads_of(module, pooled, "v")
            keys = [(a, c) for a in range(pooled.shape[1]) for c in range(pooled.shape[2])]
            ky, kx = torch.tensor([p[0] for p in keys]), torch.tensor([p[1] for p in keys])
            out = torch.zeros_like(q[:, :2])
            for b in range(x.shape[0]):
                for h in range(2):
                    for y in range(x.shape[1]):
                        for xx in range(x.shape[2]):
                            head = 2 * g + h
                            out[b, h, y, xx] = attend_to(q[b, head, y, xx], k[b, head, ky, kx], v[b, head, ky, kx])
            outs.append(out)
        if per_scale:
            return [o.permute(0, 2, 3, 1, 4).flatten(3) for o in outs]
        return output_projection(module, torch.cat(outs, dim=1))

    x = feature_map(5, 7)
    assert_same_forward_and_gradients(module, transcription, x)
    for ours, want in zip(module(x, per_scale=True), transcription(x, per_scale=True)):
        torch.testing.assert_close(ours, want)


def test_multiscale_heads_must_split_evenly():
    with pytest.raises(MultiheadError, match="divisible by the number of scales"):
        MultiScaleHeadAttention(12, 3, scales=(1, 2))


# -- DLGSANet -----------------------------------------------------------------------------------


def test_sparse_global_attention_keeps_each_querys_top_k_keys():
    module = randomize(SparseGlobalAttention(8, 2, top_k=5).double())

    def transcription(x):
        q, k, v = (heads_of(module, x, w).flatten(2, 3) for w in "qkv")
        logits = q @ k.transpose(-2, -1) / math.sqrt(module.head_dim)
        kept = logits.topk(5, dim=-1).indices
        mask = torch.full_like(logits, float("-inf")).scatter(-1, kept, 0.0)
        out = torch.softmax(logits + mask, dim=-1) @ v
        return output_projection(module, out.view(*out.shape[:2], *x.shape[1:3], -1))

    assert_same_forward_and_gradients(module, transcription, feature_map(4, 5))


def test_dlgsa_pair_is_local_then_sparse_global():
    pair = dlgsa_pair(16, 2, kernel=3, top_k=4)
    assert isinstance(pair[0].attention, NeighborhoodAttention2d)
    assert isinstance(pair[1].attention, SparseGlobalAttention)
    x = torch.randn(2, 6, 6, 16)
    assert pair(x).shape == x.shape


# -- local + global dual path -------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["heads", "sum", "gate"])
@pytest.mark.parametrize("local", ["window", "neighborhood"])
def test_local_global_attention_is_a_window_path_and_a_pooled_path(mix, local):
    module = randomize(LocalGlobalAttention(8, 2, window=3, pool=2, mix=mix, local=local).double())
    rows, cols = 6, 7

    def window_keys(h, y, x):
        return [(a, c) for a in range(rows) if a // 3 == y // 3 for c in range(cols) if c // 3 == x // 3]

    near_keys = window_keys if local == "window" else nat_keys(rows, cols, 3, 1)

    def transcription(x):
        near = per_query(module, x, near_keys)
        q = heads_of(module, x, "q")
        pooled = pooled_map(x, 2)
        k, v = heads_of(module, pooled, "k").flatten(2, 3), heads_of(module, pooled, "v").flatten(2, 3)
        far = (torch.softmax(q.flatten(2, 3) @ k.transpose(-2, -1) / math.sqrt(4), -1) @ v).view(q.shape)
        if mix == "heads":
            out = torch.cat([near[:, :1], far[:, 1:]], dim=1)
        elif mix == "sum":
            out = near + far
        else:
            gate = torch.sigmoid(module.gate(x)).permute(0, 3, 1, 2).unsqueeze(-1)
            out = gate * near + (1 - gate) * far
        return output_projection(module, out)

    assert_same_forward_and_gradients(module, transcription, feature_map(rows, cols))


def test_local_global_presets_and_bad_arguments():
    assert LocalGlobalAttention.maformer(16, 2).mix == "gate"
    assert LocalGlobalAttention.duoformer(16, 2).mix == "heads"
    transnext = LocalGlobalAttention.transnext(16, 2)
    assert (transnext.local, transnext.window) == ("neighborhood", 3)
    with pytest.raises(MultiheadError, match="mix must be one of"):
        LocalGlobalAttention(16, 2, mix="concat")
    with pytest.raises(MultiheadError, match="pooling must be one of"):
        LocalGlobalAttention(16, 2, pooling="median")
    pooled = LocalGlobalAttention(16, 2, pooling="max", pool=3)
    assert pooled(torch.randn(1, 7, 7, 16)).shape == (1, 7, 7, 16)


# -- CrossViT -----------------------------------------------------------------------------------


def test_cross_attention_fusion_is_crossvit():
    module = randomize(CrossAttentionFusion(6, 8, 2).double())
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 7, 8, generator=gen, dtype=torch.float64)

    def transcription(a):
        attn = module.attention
        cls = module.into(a[:, :1])                                       # f(x_cls)
        x = F.layer_norm(torch.cat([cls, b[:, 1:]], 1), (8,), module.norm.weight, module.norm.bias)
        q = attn.q_proj(x[:, :1]).view(2, 1, 2, 4).transpose(1, 2)       # the one query: the CLS token
        k = attn.k_proj(x).view(2, 7, 2, 4).transpose(1, 2)
        v = attn.v_proj(x).view(2, 7, 2, 4).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)   # (B, heads, 1, 1 + M): linear
        fused = cls + attn.out_proj((weights @ v).transpose(1, 2).reshape(2, 1, 8))
        return torch.cat([module.back(fused), a[:, 1:]], dim=1)          # g(y_cls), patches unchanged

    assert_same_forward_and_gradients(module, transcription, a, call=lambda a: module(a, b))


def test_crossvit_attention_keeps_branches_apart_and_fuses_their_cls_tokens():
    module = randomize(CrossViTAttention(8, 2, split=4).double())
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    attn = module.attention
    y = torch.cat([attn(x[:, :4]), attn(x[:, 4:])], dim=1)  # each branch attends within itself
    want = torch.cat([module.fuse_a(y[:, :4], y[:, 4:]), module.fuse_b(y[:, 4:], y[:, :4])], dim=1)
    torch.testing.assert_close(module(x), want)


# -- errors -------------------------------------------------------------------------------------


def test_blocks_name_the_feature_map_convention():
    module = WindowAttention(16, 2, 4)
    with pytest.raises(MultiheadError, match=r"channels-last feature map \(batch, H, W, 16\)"):
        module(torch.randn(2, 16, 8, 8))
    with pytest.raises(MultiheadError, match="relative_bias must be one of"):
        WindowAttention(16, 2, 4, relative_bias="learned")
    with pytest.raises(MultiheadError, match="window"):
        WindowAttention(16, 2, 0)


def test_need_weights_returns_per_head_weights_inside_the_pattern():
    module = WindowAttention(16, 2, 3, backend="reference")
    y, weights = module(torch.randn(1, 6, 6, 16), need_weights=True)
    assert y.shape == (1, 6, 6, 16) and weights.shape == (1, 2, 36, 36)
    mask = module.pattern_for((6, 6)).dense_mask(36, 36)[0, 0]
    assert (weights[..., ~mask] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 36))
    _, channel_weights = ChannelGroupAttention(16, 4, backend="reference")(torch.randn(1, 5, 5, 16),
                                                                          need_weights=True)
    assert channel_weights.shape == (1, 4, 4, 4)  # per group, C_g x C_g


def test_token_and_branch_shapes_are_checked():
    with pytest.raises(MultiheadError, match=r"takes \(batch, 36, dim\) tokens"):
        OnTokens(WindowAttention(16, 2, 3), (6, 6))(torch.randn(1, 35, 16))
    with pytest.raises(MultiheadError, match="CLS token first"):
        CrossAttentionFusion(8, 8, 2)(torch.randn(1, 4, 8), torch.randn(1, 1, 8))
    with pytest.raises(MultiheadError, match="at least two tokens per branch"):
        CrossViTAttention(8, 2, split=4)(torch.randn(1, 5, 8))


def test_grid_attention_takes_a_pattern_and_scores_add_to_the_relative_bias():
    from multihead.patterns import Neighborhood
    from multihead.scores import Softcap
    from multihead.vision import GridAttention

    x = torch.randn(1, 5, 5, 16)
    own = GridAttention(16, 2, pattern=Neighborhood(3, grid=(5, 5)))
    same = NeighborhoodAttention2d(16, 2, 3, relative_bias=None)
    same.load_state_dict(own.state_dict())
    torch.testing.assert_close(own(x), same(x))
    with pytest.raises(MultiheadError, match="builds its own pattern"):
        WindowAttention(16, 2, 3, pattern=Neighborhood(3, grid=(5, 5)))
    capped = WindowAttention(16, 2, 3, score=Softcap(0.1))
    plain = WindowAttention(16, 2, 3)
    plain.load_state_dict(capped.state_dict())
    assert len(capped.grid_score((5, 5))) == 2 and not torch.allclose(capped(x), plain(x))
    # NAT binds its table with the dilation, and the module's score still follows it
    dilated = NeighborhoodAttention2d(16, 2, 3, dilation=2, score=Softcap(0.1))
    assert len(dilated.grid_score((5, 5))) == 2 and dilated.grid_score((5, 5))[1] is dilated.score
    bare = NeighborhoodAttention2d(16, 2, 3, dilation=2)
    bare.load_state_dict(dilated.state_dict())
    assert not torch.allclose(dilated(x), bare(x))


def test_blocks_refuse_options_they_have_no_place_for():
    from multihead.scores import Softcap

    with pytest.raises(MultiheadError, match="does not take score="):
        ChannelGroupAttention(16, 2, score=Softcap(1.0))
    with pytest.raises(MultiheadError, match="does not take score="):
        MultiScaleHeadAttention(16, 2, (1, 2), score=Softcap(1.0))
    with pytest.raises(MultiheadError, match="does not take score="):
        LocalGlobalAttention(16, 2, score=Softcap(1.0))
