"""Each bad input gives a ValueError (a multihead subclass) that names the argument and the fix."""

from __future__ import annotations

import pytest
import torch

import multihead as mh
from multihead import BackendError, PatternError, ShapeError
from multihead.nn import MultiHeadAttention
from multihead.patterns import Causal, Documents, KeyPadding, PrefixLM, SlidingWindow
from multihead.scores import ALiBi, RelativePositionBias, RoPE, Softcap


def qkv(b=1, h=4, hk=4, lq=8, lk=8, d=8, dtype=torch.float32):
    return torch.randn(b, h, lq, d, dtype=dtype), torch.randn(b, hk, lk, d, dtype=dtype), torch.randn(b, hk, lk, d, dtype=dtype)


def test_errors_are_value_errors():
    assert issubclass(ShapeError, ValueError) and issubclass(PatternError, ValueError)
    assert issubclass(BackendError, ValueError)


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(4, 8, 8), *qkv()[1:]), r"q must have shape \(batch, heads, tokens, head_dim\)"),
    (lambda: qkv(h=4, hk=3), r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
    (lambda: (qkv()[0].double(), *qkv()[1:]), "q, k, v must share one dtype"),
    (lambda: (torch.ones(1, 4, 8, 8, dtype=torch.long), *qkv()[1:]), "q must be a floating-point tensor"),
    (lambda: (qkv()[0], torch.randn(1, 4, 8, 8), torch.randn(1, 4, 7, 8)), "k and v must have the same heads and tokens"),
    (lambda: (qkv()[0], torch.randn(1, 4, 8, 5), torch.randn(1, 4, 8, 5)), "q and k must share head_dim"),
    (lambda: (qkv()[0], *qkv(b=2)[1:]), "q, k, v must share the batch size"),
])
def test_shape_errors(make, match):
    with pytest.raises(ShapeError, match=match):
        mh.attention(*make())


def test_device_mismatch_is_named():
    q, k, v = qkv()
    meta = torch.empty_like(k, device="meta")
    with pytest.raises(ShapeError, match="q, k, v must be on one device"):
        mh.attention(q, meta, v)


@pytest.mark.parametrize("kwargs, match", [
    ({"scale": -1.0}, "scale must be a positive finite number"),
    ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\)"),
    ({"pattern": "causal"}, "pattern must be a multihead Pattern"),
    ({"score": "alibi"}, "score must be a multihead Score"),
    ({"score": ALiBi(2)}, "ALiBi was built for 2 heads but the queries have 4; build it with heads=4"),
    ({"backend": "flash"}, "unknown backend 'flash'"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mh.attention(*qkv(), **kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: SlidingWindow(-1), r"SlidingWindow.left must be an integer >= 0, got -1"),
    (lambda: SlidingWindow(2, 1.5), r"SlidingWindow.right must be an integer >= 0"),
    (lambda: PrefixLM(0), r"PrefixLM.prefix must be an integer >= 1"),
    (lambda: Documents(), "exactly one of cu_seqlens or doc_ids"),
    (lambda: Documents(torch.tensor([0, 3, 3, 5])), "increase strictly"),
    (lambda: Documents(torch.tensor([1, 3])), "must start at 0"),
    (lambda: Documents(doc_ids=torch.tensor([0, 1, 0])), "one contiguous run"),
    (lambda: KeyPadding(torch.ones(2, 3)), "key_padding_mask must be a bool tensor"),
    (lambda: Softcap(0), "Softcap.cap must be a positive finite number"),
    (lambda: RelativePositionBias(4, num_buckets=32, max_distance=4), "must exceed the exact range"),
    (lambda: RoPE(8, rotary_dim=3), "RoPE.rotary_dim must be an even integer"),
])
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("pattern, lq, lk, match", [
    (SlidingWindow(7, 7), 8, 8, r"covers every one of the 8 keys; use Full\(\)"),
    (PrefixLM(9), 8, 8, r"PrefixLM\(prefix=9\) is longer than the 8 keys"),
    (Documents(torch.tensor([0, 4, 6])), 8, 8, "Documents covers 6 packed tokens"),
    (Causal(), 8, 5, r"query 0 \(batch element 0, head 0\) can see no key"),
])
def test_pattern_range_errors(pattern, lq, lk, match):
    with pytest.raises(PatternError, match=match):
        mh.attention(*qkv(lq=lq, lk=lk), pattern=pattern)


def test_fully_padded_sequence_is_an_error_not_nan():
    q, k, v = qkv(b=2)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[1] = True
    with pytest.raises(PatternError, match=r"batch element 1.*can see no key"):
        mh.attention(q, k, v, pattern=KeyPadding(padding))


def test_a_padding_mask_changed_in_place_is_checked_again():
    """Patterns holding tensors are checked on every call: the check of a value pattern is kept."""
    q, k, v = qkv(b=2)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    pattern = KeyPadding(padding)
    mh.attention(q, k, v, pattern=pattern)
    padding[1] = True
    with pytest.raises(PatternError, match=r"batch element 1.*can see no key"):
        mh.attention(q, k, v, pattern=pattern)


def test_a_value_pattern_is_checked_once_per_lengths_and_its_errors_every_time(monkeypatch):
    calls = []
    pattern = Causal() & SlidingWindow(5, 0)  # a fresh value: not asked before in this process
    original = type(pattern).key_counts
    monkeypatch.setattr(type(pattern), "key_counts", lambda self, *a: calls.append(a) or original(self, *a))
    for _ in range(3):
        mh.attention(*qkv(lq=8, lk=8), pattern=pattern)
        mh.attention(*qkv(lq=8, lk=8), pattern=Causal() & SlidingWindow(5, 0))  # equal: the same check
    assert len(calls) == 1
    for _ in range(2):
        with pytest.raises(PatternError, match="can see no key"):
            mh.attention(*qkv(lq=8, lk=5), pattern=pattern)
    assert calls == [(8, 8, torch.device("cpu")), (8, 5, torch.device("cpu"))]


def test_backend_that_cannot_serve_names_one_that_can():
    with pytest.raises(BackendError, match=r"backend 'sdpa' cannot serve.*Softcap.*Backends that can: \[.*'reference'"):
        mh.attention(*qkv(), score=Softcap(3.0), backend="sdpa")
    with pytest.raises(BackendError, match="does not return attention weights"):
        mh.attention(*qkv(), backend="sdpa", return_weights=True)


def test_sdpa_declines_a_dense_mask_too_large():
    """SDPA's mask is dense: per head (a score, a per-head pattern) it is heads x N x N. Past
    ``max_mask_elements`` it declines and names blocksparse, instead of exhausting memory."""
    from multihead.backends.sdpa import SDPABackend
    from multihead.request import make_request

    sdpa = SDPABackend(max_mask_elements=4 * 8 * 8 - 1)
    q, k, v = qkv()
    assert sdpa.unsupported(make_request(q, k, v)) is None  # no mask at all
    assert sdpa.unsupported(make_request(q, k, v, pattern=Causal())) is None  # is_causal, no mask
    assert sdpa.unsupported(make_request(q, k, v, pattern=SlidingWindow(2))) is None  # 64 elements
    why = sdpa.unsupported(make_request(q, k, v, pattern=Causal(), score=ALiBi(4)))  # 4 x 64
    assert "256 elements" in why and "blocksparse" in why


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 30, "heads": 4}, r"dim \(30\) is not divisible by heads \(4\)"),
    ({"dim": 32, "heads": 4, "kv_heads": 3}, r"kv_heads \(3\) must divide heads \(4\)"),
    ({"dim": 32, "heads": 0}, "heads must be a positive integer"),
    ({"dim": 32, "heads": 4, "dropout": 1.5}, r"dropout must be in \[0, 1\)"),
])
def test_module_constructor_errors(kwargs, match):
    with pytest.raises(ShapeError, match=match):
        MultiHeadAttention(**kwargs)


def test_module_input_errors():
    m = MultiHeadAttention(32, 4)
    with pytest.raises(ShapeError, match=r"x must have shape \(batch, tokens, 32\)"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(ShapeError, match="x and context batch sizes differ"):
        m(torch.randn(2, 5, 32), torch.randn(3, 5, 32))
    with pytest.raises(ShapeError, match="add_bias_kv or add_zero_attn"):
        MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(32, 4, add_bias_kv=True))
