"""Linear and recurrent attention: the chunked forms against the recurrent definitions (forward,
gradients, final state), against dense formulas, streaming, packing, and the modules."""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead.errors import MultiheadError, ShapeError
from multihead.linear import (Aaren, LightningAttention, LinearAttention, ManhattanSelfAttention, PrefixState,
                              Retention, chunked_linear_attention, chunked_prefix_attention,
                              decomposed_manhattan_attention, manhattan_attention, manhattan_decay,
                              recurrent_linear_attention, recurrent_prefix_attention)
from multihead.patterns import Axial, Causal

from conftest import assert_within_tolerance

HEADS, TOKENS, D = 2, 37, 4
CU = torch.tensor([0, 5, 5, 21, 37])       # an empty sequence, one shorter than a chunk, ragged ends
CHUNK = 8


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _linear_inputs(batch, decay, packed, initial, normalize):
    """Leaves in float64: q, k (positive features), v, log_decay, initial state."""
    q, k = (torch.nn.functional.elu(_randn(batch, HEADS, TOKENS, D, seed=s)) + 1 for s in (1, 2))
    v = _randn(batch, HEADS, TOKENS, D, seed=3)
    log_decay = {"none": None, "per_head": -torch.rand(HEADS, dtype=torch.float64) * 0.3 - 0.01,
                 "per_token": -torch.rand(batch, HEADS, TOKENS, dtype=torch.float64) * 0.5}[decay]
    sequences = len(CU) - 1 if packed else batch
    state = _randn(sequences, HEADS, D, D + normalize, seed=4) if initial else None
    if state is not None and normalize:
        state = state.abs()  # a normaliser column that could come from positive features
    return [t for t in (q, k, v, log_decay, state)]


def _run(fn, leaves, packed, normalize, dtype, **options):
    q, k, v, log_decay, state = (None if t is None else t.detach().to(dtype).requires_grad_() for t in leaves)
    out, final = fn(q, k, v, log_decay=log_decay, normalize=normalize, cu_seqlens=CU if packed else None,
                    initial_state=state, **options)
    weight = _randn(*out.shape, seed=9, dtype=dtype)
    ((out * weight).sum() + final.square().sum()).backward()
    grads = [t.grad for t in (q, k, v, log_decay, state) if t is not None]
    return [out, final, *grads]


@pytest.mark.parametrize("decay", ["none", "per_head", "per_token"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("initial", [False, True])
def test_chunked_linear_attention_equals_recurrent(decay, normalize, packed, initial):
    """Forward, final state and every gradient, in float32 within the tolerance rule (truth: the
    recurrent form in float64; baseline: the recurrent form in float32)."""
    leaves = _linear_inputs(1 if packed else 2, decay, packed, initial, normalize)
    truth = _run(recurrent_linear_attention, leaves, packed, normalize, torch.float64)
    baseline = _run(recurrent_linear_attention, leaves, packed, normalize, torch.float32)
    # chunk 3: a dozen chunks, so the blocked inter-chunk pass has several groups; slabs of 7 and 12
    # tokens cut sequences (and, packed, hold an empty one), so states cross slab ends
    for chunk, slab in ((CHUNK, None), (3, None), (CHUNK, 7), (3, 12)):
        chunked = _run(chunked_linear_attention, leaves, packed, normalize, torch.float32, chunk_size=chunk,
                       slab_size=slab)
        for what, r, t, b in zip(["out", "state", "dq", "dk", "dv", "ddecay", "dstate"], chunked, truth, baseline):
            assert r.shape == t.shape, what
            assert_within_tolerance(r, t, b, torch.float32, what)


@pytest.mark.parametrize("packed", [False, True])
def test_non_causal_linear_attention_chunked_recurrent_and_dense(packed):
    q, k, v, _, _ = _linear_inputs(1 if packed else 2, "none", packed, False, True)
    cu = CU if packed else None
    a, sa = recurrent_linear_attention(q, k, v, causal=False, normalize=True, cu_seqlens=cu)
    for slab in (None, 7):  # slabs of 7 tokens: the sums and the reads cross slab ends
        b, sb = chunked_linear_attention(q, k, v, causal=False, normalize=True, cu_seqlens=cu, chunk_size=CHUNK,
                                         slab_size=slab)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(sa, sb)
    # Dense: every token weighs every key of its own sequence by q . k / sum.
    bounds = CU.tolist() if packed else [0, TOKENS]
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        weights = q[..., lo:hi, :] @ k[..., lo:hi, :].transpose(-1, -2)
        dense = (weights / (weights.sum(-1, keepdim=True) + 1e-6)) @ v[..., lo:hi, :]
        torch.testing.assert_close(b[..., lo:hi, :], dense)


def test_causal_decayed_linear_attention_equals_the_dense_parallel_form():
    """RetNet's parallel form ``(q k^T * D) v`` with ``D[i, j] = gamma^(i - j)`` below the diagonal."""
    q, k, v, log_decay, _ = _linear_inputs(2, "per_head", False, False, False)
    out, _ = chunked_linear_attention(q, k, v, log_decay=log_decay, chunk_size=CHUNK)
    i = torch.arange(TOKENS)
    distance = (i[:, None] - i[None, :]).double()
    mask = (log_decay[:, None, None] * distance).exp() * (distance >= 0)
    torch.testing.assert_close(out, ((q @ k.transpose(-1, -2)) * mask) @ v)


def test_packed_sequences_equal_separate_calls_and_reset_the_state():
    q, k, v, log_decay, _ = _linear_inputs(1, "per_token", True, False, False)
    out, final = chunked_linear_attention(q, k, v, log_decay=log_decay, cu_seqlens=CU, chunk_size=CHUNK)
    bounds = CU.tolist()
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = [t[..., lo:hi, :] for t in (q, k, v)]
        alone, state = chunked_linear_attention(*part, log_decay=log_decay[..., lo:hi], chunk_size=CHUNK)
        torch.testing.assert_close(out[..., lo:hi, :], alone)
        torch.testing.assert_close(final[s], state[0])
    assert final[1].abs().max() == 0  # the empty sequence keeps its (zero) initial state


@pytest.mark.parametrize("chunked", [True, False])
def test_streaming_in_two_pieces_equals_one_pass(chunked):
    q, k, v, log_decay, _ = _linear_inputs(2, "per_head", False, False, True)
    run = (lambda *a, **o: chunked_linear_attention(*a, chunk_size=CHUNK, **o)) if chunked \
        else recurrent_linear_attention
    whole, final = run(q, k, v, log_decay=log_decay, normalize=True)
    first, state = run(*(t[..., :20, :] for t in (q, k, v)), log_decay=log_decay, normalize=True)
    second, state = run(*(t[..., 20:, :] for t in (q, k, v)), log_decay=log_decay, normalize=True,
                        initial_state=state)
    torch.testing.assert_close(torch.cat([first, second], 2), whole)
    torch.testing.assert_close(state, final)


@pytest.mark.parametrize("causal", [True, False])
def test_feature_map_and_scale_equal_mapping_the_inputs_first(causal):
    """``feature_map`` and ``scale`` are applied inside the call (slab by slab when causal): the
    same as passing ``phi(q) * scale`` and ``phi(k)``, in both forms, gradients included."""
    q, k, v = (_randn(2, HEADS, TOKENS, D, seed=s).requires_grad_() for s in (1, 2, 3))
    silu = torch.nn.functional.silu
    decay = {"log_decay": -torch.full((HEADS,), 0.1, dtype=torch.float64)} if causal else {}
    want, want_state = recurrent_linear_attention(silu(q) * 0.3, silu(k), v, causal=causal, **decay)
    wanted = torch.autograd.grad(want.sum(), (q, k, v))
    for fn, options in ((recurrent_linear_attention, {}), (chunked_linear_attention, {"chunk_size": 4, "slab_size": 9})):
        out, state = fn(q, k, v, feature_map=silu, scale=0.3, causal=causal, **decay, **options)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(state, want_state)
        for got, expected in zip(torch.autograd.grad(out.sum(), (q, k, v)), wanted):
            torch.testing.assert_close(got, expected)


def test_gradcheck_chunked_linear_attention():
    q, k, v, log_decay, state = (t.detach().requires_grad_() for t in _linear_inputs(1, "per_token", True, True, True))
    small = [t[..., :13, :2].contiguous().detach().requires_grad_() for t in (q, k, v)]
    g = log_decay[..., :13].detach().requires_grad_()
    cu = torch.tensor([0, 6, 13])
    s = state[:2, :, :2, :3].detach().requires_grad_()

    def fn(q, k, v, g, s):
        return chunked_linear_attention(q, k, v, log_decay=g, normalize=True, cu_seqlens=cu, initial_state=s,
                                        chunk_size=4, slab_size=5)  # slabs cut both sequences
    assert torch.autograd.gradcheck(fn, (*small, g, s))


# Aaren: softmax attention of one query over every prefix.

def _prefix_inputs(batch, scale=3.0):
    return _randn(batch, HEADS, TOKENS, seed=5) * scale, _randn(batch, HEADS, TOKENS, D, seed=6)


def _prefix_run(fn, scores, v, packed, state, dtype, **options):
    leaves = [scores.detach().to(dtype).requires_grad_(), v.detach().to(dtype).requires_grad_()]
    initial = None if state is None else PrefixState(*(t.detach().to(dtype).requires_grad_() for t in state))
    out, final = fn(*leaves, cu_seqlens=CU if packed else None, initial_state=initial, **options)
    weight = _randn(*out.shape, seed=9, dtype=dtype)
    finite = final.max.isfinite()  # the empty sequence's max stays -inf
    ((out * weight).sum() + final.sums.square().sum() + final.max[finite].square().sum()).backward()
    grads = [leaves[0].grad, leaves[1].grad] + ([initial.max.grad, initial.sums.grad] if initial else [])
    return [out, final.max.masked_fill(~finite, 0), final.sums, *grads]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("initial", [False, True])
def test_chunked_prefix_attention_equals_the_rnn(packed, initial):
    scores, v = _prefix_inputs(1 if packed else 2)
    sequences = len(CU) - 1 if packed else 2
    state = (_randn(sequences, HEADS, seed=7), _randn(sequences, HEADS, D + 1, seed=8).abs()) if initial else None
    truth = _prefix_run(recurrent_prefix_attention, scores, v, packed, state, torch.float64)
    baseline = _prefix_run(recurrent_prefix_attention, scores, v, packed, state, torch.float32)
    for parallel, slab in ((True, None), (False, None), (True, 7)):
        chunked = _prefix_run(chunked_prefix_attention, scores, v, packed, state, torch.float32, chunk_size=CHUNK,
                              parallel_scan=parallel, slab_size=slab)
        for what, r, t, b in zip(["out", "max", "sums", "dscores", "dv", "dmax", "dsums"], chunked, truth, baseline):
            assert_within_tolerance(r, t, b, torch.float32, what)


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_prefix_scan_equals_softmax_attention_over_each_prefix(scale):
    """The library's own causal softmax attention with the same query at every position."""
    query, keys, v = _randn(2, HEADS, 1, D, seed=1), _randn(2, HEADS, TOKENS, D, seed=2), _randn(2, HEADS, TOKENS, D, seed=3)
    scores = (query * keys).sum(-1) * scale * D ** -0.5
    direct = mh.attention(query.expand_as(keys), keys, v, pattern=Causal(), scale=scale * D ** -0.5,
                          backend="reference")
    for out in (recurrent_prefix_attention(scores, v)[0], chunked_prefix_attention(scores, v, chunk_size=CHUNK)[0]):
        assert out.isfinite().all()
        torch.testing.assert_close(out, direct)


def test_prefix_streaming_in_two_pieces_equals_one_pass():
    scores, v = _prefix_inputs(2)
    whole, final = chunked_prefix_attention(scores, v, chunk_size=CHUNK)
    first, state = chunked_prefix_attention(scores[..., :11], v[..., :11, :], chunk_size=CHUNK)
    second, state = chunked_prefix_attention(scores[..., 11:], v[..., 11:, :], chunk_size=CHUNK, initial_state=state)
    torch.testing.assert_close(torch.cat([first, second], 2), whole)
    torch.testing.assert_close(state.sums / state.sums[..., -1:], final.sums / final.sums[..., -1:])


def test_gradcheck_chunked_prefix_attention():
    scores, v = (t[..., :13].detach().requires_grad_() if t.dim() == 3 else t[..., :13, :2].detach().requires_grad_()
                 for t in _prefix_inputs(1))
    cu = torch.tensor([0, 6, 13])
    assert torch.autograd.gradcheck(lambda s, v: chunked_prefix_attention(s, v, cu_seqlens=cu, chunk_size=4, slab_size=5)[0],
                                    (scores, v))


# RMT's Manhattan self-attention.

GRID = (3, 5)


def _grid_inputs():
    return [_randn(2, HEADS, GRID[0] * GRID[1], D, seed=s) for s in (1, 2, 3)]


def test_manhattan_decay_is_gamma_to_the_city_block_distance():
    log_decay = torch.tensor([-0.1, -0.7], dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    distance = (ys[:, None] - ys[None]).abs() + (xs[:, None] - xs[None]).abs()
    torch.testing.assert_close(manhattan_decay(GRID, log_decay), (log_decay[:, None, None] * distance).exp())


def test_manhattan_attention_without_decay_is_softmax_attention():
    q, k, v = _grid_inputs()
    zero = torch.zeros(HEADS, dtype=torch.float64)
    torch.testing.assert_close(manhattan_attention(q, k, v, GRID, zero), mh.attention(q, k, v, backend="reference"))


def test_decomposed_manhattan_attention_is_rows_then_columns_with_axis_decays():
    """Dense transcription: axial softmax weights (the library's Axial patterns) times the 2-D decay,
    which on a row (a column) is the axis decay; rows first, then columns."""
    q, k, v = _grid_inputs()
    log_decay = torch.tensor([-0.2, -0.9], dtype=torch.float64)
    decay = manhattan_decay(GRID, log_decay)
    _, along_row = mh.attention(q, k, v, pattern=Axial(GRID, axis=1), backend="reference", return_weights=True)
    rows = (along_row * decay) @ v
    _, along_col = mh.attention(q, k, rows, pattern=Axial(GRID, axis=0), backend="reference", return_weights=True)
    torch.testing.assert_close(decomposed_manhattan_attention(q, k, v, GRID, log_decay), (along_col * decay) @ rows)


def test_gradcheck_decomposed_manhattan_attention():
    q, k, v = (t[:1, :, :, :2].detach().requires_grad_() for t in _grid_inputs())
    log_decay = torch.tensor([-0.2, -0.9], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: decomposed_manhattan_attention(q, k, v, GRID, log_decay), (q, k, v))


# Modules.

MODULES = {
    "linear_elu": lambda form: LinearAttention(16, 4, form=form, chunk_size=CHUNK),
    "slab_relu": lambda form: LinearAttention(16, 4, feature_map="relu", causal=False, form=form, chunk_size=CHUNK),
    "retention": lambda form: Retention(16, 4, kv_heads=2, form=form, chunk_size=CHUNK),
    "lightning": lambda form: LightningAttention(16, 4, layer=1, layers=3, form=form, chunk_size=CHUNK),
    "aaren": lambda form: Aaren(16, 4, form=form, chunk_size=CHUNK),
}


def _module_pair(name):
    torch.manual_seed(0)
    chunked = MODULES[name]("chunked")
    recurrent = MODULES[name]("recurrent")
    recurrent.load_state_dict(chunked.state_dict())
    return chunked, recurrent


@pytest.mark.parametrize("name", list(MODULES))
def test_module_forms_agree_in_output_state_and_parameter_gradients(name):
    chunked, recurrent = _module_pair(name)
    x = _randn(1, TOKENS, 16, seed=1, dtype=torch.float32)
    results = []
    for module in (chunked, recurrent):
        y, state = module(x, cu_seqlens=CU, return_state=True)
        y.square().sum().backward()
        results.append((y, state, {n: p.grad for n, p in module.named_parameters()}))
    (ya, sa, ga), (yb, sb, gb) = results
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-4)
    for a, b in zip(sa if isinstance(sa, tuple) else [sa], sb if isinstance(sb, tuple) else [sb]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("name", ["linear_elu", "retention", "lightning", "aaren"])
def test_module_streams_with_its_state(name):
    module, _ = _module_pair(name)
    x = _randn(2, TOKENS, 16, seed=2, dtype=torch.float32)
    whole = module(x)
    first, state = module(x[:, :17], return_state=True)
    second = module(x[:, 17:], initial_state=state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-5, rtol=1e-4)


def test_manhattan_module_forms_and_shapes():
    module = ManhattanSelfAttention(16, 4, GRID, kv_heads=2)
    x = _randn(2, GRID[0] * GRID[1], 16, seed=3, dtype=torch.float32)
    y = module(x)
    assert y.shape == x.shape
    module.decomposed = False
    assert module(x).shape == x.shape and not torch.allclose(module(x), y)


def test_errors_name_the_argument():
    q = k = v = torch.randn(2, 2, 8, 4)
    with pytest.raises(ShapeError, match="batch must be 1"):
        chunked_linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ShapeError, match="cu_seqlens must start at 0"):
        chunked_linear_attention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 4, 7]))
    with pytest.raises(ShapeError, match="non-decreasing"):
        chunked_linear_attention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 6, 4, 8]))
    with pytest.raises(ShapeError, match="initial_state must have shape"):
        recurrent_linear_attention(q, k, v, normalize=True, initial_state=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ShapeError, match="log_decay needs causal=True"):
        chunked_linear_attention(q, k, v, log_decay=-torch.ones(2), causal=False)
    with pytest.raises(ShapeError, match="log_decay must have shape"):
        chunked_linear_attention(q, k, v, log_decay=-torch.ones(3))
    with pytest.raises(ShapeError, match="log_decay must be <= 0"):
        recurrent_linear_attention(q, k, v, log_decay=torch.tensor([-0.1, 0.1]))
    with pytest.raises(ShapeError, match="chunk_size"):
        chunked_linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ShapeError, match="slab_size must be a positive integer"):
        chunked_prefix_attention(q[..., 0], v, slab_size=0)
    with pytest.raises(ShapeError, match="initial_state must be a PrefixState"):
        chunked_prefix_attention(q[..., 0], v, initial_state=torch.zeros(2, 2))
    with pytest.raises(MultiheadError, match="feature_map must be one of"):
        LinearAttention(16, 4, feature_map="softmax")
    with pytest.raises(MultiheadError, match="form must be one of"):
        Retention(16, 4, form="parallel")
    with pytest.raises(ShapeError, match="decays must be 4 values"):
        Retention(16, 4, decays=[0.5, 0.9, 1.2, 0.9])
    with pytest.raises(ShapeError, match="neither context"):
        Aaren(16, 4)(torch.randn(1, 5, 16), torch.randn(1, 5, 16))
    with pytest.raises(ShapeError, match="grid must be"):
        ManhattanSelfAttention(16, 4, (3, 5))(torch.randn(1, 16, 16))


@pytest.mark.parametrize("count", [1, 2, 5, 17, 64, 65, 200])
def test_blocked_and_parallel_scans_equal_the_sequential_scan(count):
    """Random sequence starts, with Aaren's (max, sums) combine."""
    from multihead.linear.prefix import _combine_softmax
    from multihead.linear.scan import blocked_scan, parallel_scan, sequential_scan
    gen = torch.Generator().manual_seed(count)
    maxima = torch.randn(2, count, generator=gen, dtype=torch.float64) * 5
    sums = torch.rand(2, count, 3, generator=gen, dtype=torch.float64)
    starts = torch.rand(count, generator=gen) < 0.2
    starts[0] = True
    expected = sequential_scan((maxima, sums), _combine_softmax, starts)
    for scan in (blocked_scan, parallel_scan):
        for got, want in zip(scan((maxima, sums), _combine_softmax, starts), expected):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", list(MODULES))
def test_packed_sequences_through_a_transformer_block_equal_separate_calls(name):
    """``cu_seqlens`` passes through ``TransformerBlock``; packing changes nothing per sequence."""
    from multihead.models import TransformerBlock
    module, _ = _module_pair(name)
    block = TransformerBlock(16, module)
    x = _randn(1, TOKENS, 16, seed=4, dtype=torch.float32)
    packed = block(x, cu_seqlens=CU)
    bounds = CU.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            torch.testing.assert_close(packed[:, lo:hi], block(x[:, lo:hi]), atol=1e-5, rtol=1e-4)
