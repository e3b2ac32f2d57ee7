"""Hugging Face models served structurally by attn_implementation="multihead": the layer's sliding
window, softcap, sinks and padding become patterns and scores (no dense mask), and greedy
generation gives the tokens of transformers' own attention, with and without its cache, on tiny
random-init Llama, Mistral, Qwen2, Gemma2 and gpt-oss."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import masking_utils as mu  # noqa: E402

from multihead.cache import BooleanMask  # noqa: E402
from multihead.integrations import hf  # noqa: E402
from multihead.patterns import Causal, Intersection, KeyPadding, Sinks, SlidingWindow, Union  # noqa: E402
from multihead.scores.softcap import Softcap  # noqa: E402

COMMON = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
# name: (config class, its settings, the reference implementation: sdpa where transformers' sdpa serves
# the model, eager where it refuses softcap (Gemma2) or sinks (gpt-oss))
MODELS = {
    "llama": ("LlamaConfig", {}, "sdpa"),
    "mistral": ("MistralConfig", dict(sliding_window=4), "sdpa"),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), "sdpa"),
    "gemma2": ("Gemma2Config", dict(head_dim=8, sliding_window=4), "eager"),
    "gpt_oss": ("GptOssConfig", dict(head_dim=8, sliding_window=4, num_local_experts=4, num_experts_per_tok=2), "eager"),
}


def tiny(name, implementation):
    config_class, settings, _ = MODELS[name]
    config = getattr(transformers, config_class)(**COMMON, **settings)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
    if name == "gpt_oss":  # sinks start at zero-ish: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0, 2)
    return model


def batch():
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return ids, mask


@pytest.fixture
def calls(monkeypatch):
    """Every (pattern, score) that multihead.attention received from the integration."""
    seen = []
    inner = hf.attention

    def spy(q, k, v, **options):
        seen.append((options["pattern"], options["score"], q.shape[2], k.shape[2]))
        return inner(q, k, v, **options)

    monkeypatch.setattr(hf, "attention", spy)
    return seen


def parts(pattern):
    """The leaves of a pattern's intersections, unions and sinks."""
    if isinstance(pattern, Sinks):
        return [pattern, *parts(pattern.pattern)]
    if isinstance(pattern, (Intersection, Union)):
        return [leaf for part in pattern.parts for leaf in parts(part)]
    return [pattern]


def score_terms(score):
    return list(getattr(score, "terms", [score] if score is not None else []))


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_equals_transformers_with_and_without_its_cache(name, calls):
    ids, mask = batch()
    reference = tiny(name, MODELS[name][2])
    ours = tiny(name, "multihead")
    for use_cache in (True, False):
        want = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                  pad_token_id=0, use_cache=use_cache)
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                            pad_token_id=0, use_cache=use_cache)
        assert torch.equal(got, want), use_cache
    assert want[:, 6:].unique().numel() > 2  # the continuation is not one repeated token
    with torch.no_grad():
        calls.clear()
        logits = ours(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(logits[mask.bool()], reference(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                                   atol=2e-6, rtol=1e-5)
    leaves = [leaf for pattern, *_ in calls for leaf in parts(pattern)]
    assert not any(isinstance(leaf, BooleanMask) for leaf in leaves)  # structured, no dense mask
    assert any(isinstance(leaf, KeyPadding) for leaf in leaves) and any(leaf == Causal() for leaf in leaves)
    windows = [leaf for leaf in leaves if isinstance(leaf, SlidingWindow)]
    assert windows == ([] if name == "llama" else [SlidingWindow(3, 0)] * len(windows)) and (name == "llama" or windows)
    terms = [type(t).__name__ for _, score, *_ in calls for t in score_terms(score)]
    assert ("Softcap" in terms) == (name == "gemma2")
    assert ("SinkLogit" in terms) == (name == "gpt_oss")
    assert any(isinstance(leaf, Sinks) for leaf in leaves) == (name == "gpt_oss")


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_every_mask_of_a_generation_is_structured(name, calls, monkeypatch):
    """Prefill and decoding steps, sliding and full layers: the mask function never builds a
    dense mask, and the attention never receives one."""
    masks = []

    def recording(*args, **kwargs):
        masks.append(hf.multihead_mask(*args, **kwargs))
        return masks[-1]

    monkeypatch.setitem(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "multihead", recording)
    ids, mask = batch()
    tiny(name, "multihead").generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                     pad_token_id=0)
    assert len(masks) >= 6 and all(isinstance(m, hf.StructuredMask) for m in masks)
    assert {m.left for m in masks} == ({3} if name == "mistral" else {None, 3})
    assert {m.q_length for m in masks} == {6, 1}
    assert all(not isinstance(leaf, BooleanMask) for pattern, *_ in calls for leaf in parts(pattern))


def test_sinks_equal_a_softmax_with_an_extra_logit():
    """gpt-oss's s_aux: softmax over [logits, s_h] with the sink column dropped."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    sinks = torch.randn(4)
    module = torch.nn.Module()
    module.is_causal = True
    mask = hf.multihead_mask(2, 5, 5, mask_function=mu.causal_mask_function)
    got, _ = hf.multihead_attention_forward(module, q, k, v, mask, scaling=0.3, s_aux=sinks)
    logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3
    logits = logits.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    weights = torch.softmax(torch.cat([logits, sinks.view(1, 4, 1, 1).expand(2, 4, 5, 1)], -1), -1)[..., :-1]
    torch.testing.assert_close(got, (weights @ v.repeat_interleave(2, 1)).transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_mask_functions_are_recognised_or_left_dense():
    assert hf.parse_mask_function(mu.causal_mask_function) == (True, None, None)
    assert hf.parse_mask_function(mu.bidirectional_mask_function) == (False, None, None)
    assert hf.parse_mask_function(mu.sliding_window_causal_mask_function(7)) == (True, 6, None)
    bidirectional = mu.sliding_window_bidirectional_mask_function(2)
    assert hf.parse_mask_function(bidirectional) == (False, 2, 2)
    got = hf.multihead_mask(1, 7, 7, mask_function=bidirectional).pattern().dense_mask(7, 7)
    assert torch.equal(got[0], mu.sdpa_mask(1, 7, 7, mask_function=bidirectional, allow_is_causal_skip=False)[0])
    chunked = mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))
    assert hf.parse_mask_function(chunked) is None
    assert hf.parse_mask_function(mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: q >= 0)) is None
    window = mu.sliding_window_causal_mask_function(4)
    structured = hf.multihead_mask(2, 2, 9, q_offset=7, kv_offset=0, mask_function=window)
    assert isinstance(structured, hf.StructuredMask) and structured.pattern() == Causal() & SlidingWindow(3, 0)
    step = hf.multihead_mask(2, 1, 9, q_offset=8, kv_offset=0, mask_function=window)
    assert step.pattern() == SlidingWindow(3, 0)  # one query aligned with the last key: Causal adds nothing
    assert hf.multihead_mask(2, 1, 4, q_offset=8, kv_offset=5, mask_function=window).pattern() is None
    dense = hf.multihead_mask(1, 4, 4, mask_function=chunked, allow_is_causal_skip=False)
    assert isinstance(dense, torch.Tensor) and dense.shape == (1, 1, 4, 4)
    static = hf.multihead_mask(1, 1, 16, q_offset=3, kv_offset=0, mask_function=mu.causal_mask_function,
                               allow_is_causal_skip=False)  # a static cache: keys past the query
    assert isinstance(static, torch.Tensor) and static[0, 0, 0].tolist() == [True] * 4 + [False] * 12
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    left = hf.multihead_mask(2, 5, 5, mask_function=mu.causal_mask_function, attention_mask=padding.bool())
    want = mu.sdpa_mask(2, 5, 5, mask_function=mu.causal_mask_function, attention_mask=padding.bool(),
                        allow_is_causal_skip=False)
    real = padding.bool()[:, None, :, None]  # rows of real queries; padded ones only need a key
    got = left.pattern().dense_mask(5, 5).expand(2, 1, 5, 5)
    assert torch.equal(got & real, want & real) and bool(got.any(-1).all())


def test_a_long_sliding_window_prefill_runs_block_sparse(calls):
    """Mistral's window over 1024 tokens reaches multihead as a pattern that auto runs block-sparse,
    with the output of transformers' SDPA path."""
    import multihead

    config = transformers.MistralConfig(**{**COMMON, "num_hidden_layers": 1, "max_position_embeddings": 1024},
                                        sliding_window=64)
    ids = torch.randint(1, 50, (1, 1024), generator=torch.Generator().manual_seed(3))
    hidden = {}
    for implementation in ("sdpa", "multihead"):
        torch.manual_seed(0)
        model = transformers.MistralModel(config).eval()
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            hidden[implementation] = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hidden["multihead"], hidden["sdpa"], atol=2e-5, rtol=1e-4)
    (pattern, score, q_len, kv_len), = calls
    assert pattern == Causal() & SlidingWindow(63, 0) and (q_len, kv_len) == (1024, 1024)
    q, k = torch.randn(1, 4, 1024, 8), torch.randn(1, 2, 1024, 8)
    assert multihead.explain(q, k, k, pattern=pattern, show=False).backend == "blocksparse"
