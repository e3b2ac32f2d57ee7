"""TransformerLM decoding: the cached model equals the recomputed one for every catalog variant that
can decode (the others refuse with the reason), and ``generate`` gives the same tokens with and
without the cache."""

from __future__ import annotations

import pytest
import torch

from multihead import catalog
from multihead.cache import CacheError, HeadSplitCache, KVCache, ModelCache
from multihead.errors import MultiheadError, ShapeError
from multihead.models import TransformerLM
from multihead.models.lm import sample
from multihead.nn import MultiHeadAttention
from multihead.patterns import Causal, PerHead, Sinks, SlidingWindow

VOCAB = 13


def lm(pattern, max_len=64, depth=2, **options):
    torch.manual_seed(0)
    build = lambda dim, heads, n: MultiHeadAttention(dim, heads, kv_heads=2, pattern=pattern, **options)
    return TransformerLM(VOCAB, 32, depth, 4, attention=build, max_len=max_len).double().eval()


@pytest.mark.parametrize("name", list(catalog.CATALOG))
def test_every_catalog_variant_decodes_exactly_or_says_why_not(name):
    torch.manual_seed(0)
    try:
        model = TransformerLM(VOCAB, 16, 2, 2, attention=name, max_len=64).double().eval()
    except MultiheadError:  # not a causal LM variant at all (test_models_lm covers these)
        return
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    try:
        cache = model.make_cache()
    except CacheError as error:
        assert "cannot decode with a cache: " in str(error) and "use_cache=False" in str(error)
        return
    with torch.no_grad():
        want = model(tokens)
        got = [model(tokens[:, :20], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(20, 64)]
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-10, rtol=1e-8)
    assert cache.length == 64


def test_the_topologies_and_causal_patterns_of_the_catalog_decode():
    """The variants expected to decode do (the test above would also accept a refusal)."""
    decoding = ["mha", "gqa", "mqa", "moh", "sqa", "mla", "cca", "ccgqa", "low_rank", "talking_heads", "causal",
                "sliding_window", "prefix_lm", "documents", "dilated_window", "global_local", "block_local", "topk",
                "alibi", "softcap", "t5_relative_bias", "rope", "complex_rotation", "neighborhood", "swin", "cswin"]
    for name in decoding:
        TransformerLM(VOCAB, 16, 1, 2, attention=name, max_len=64).make_cache()


@pytest.mark.parametrize("pattern", [Causal(), SlidingWindow(6), Sinks(SlidingWindow(5), 2),
                                     PerHead([SlidingWindow(2)] * 2 + [SlidingWindow(9)] * 2)],
                         ids=["causal", "window", "sinks_window", "per_head_windows"])
def test_generate_with_the_cache_equals_recomputing(pattern):
    model = lm(pattern)
    if isinstance(pattern, PerHead):
        assert all(isinstance(cache, HeadSplitCache) for cache in model.make_cache())
    prompt = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    greedy = model.generate(prompt, 40, temperature=0)
    assert greedy.shape == (3, 47) and torch.equal(greedy[:, :7], prompt)
    assert torch.equal(greedy, model.generate(prompt, 40, temperature=0, use_cache=False))
    drawn = [model.generate(prompt, 40, temperature=0.8, top_k=5, use_cache=use,
                            generator=torch.Generator().manual_seed(3)) for use in (True, False)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], greedy)
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_k=1), greedy[:, :17])  # top-1 is greedy


def test_sampling_keeps_only_the_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]]).expand(2000, -1)
    drawn = sample(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 2}
    assert sample(logits, 0, None).unique().tolist() == [1]


def test_model_cache_memory_is_bounded_by_the_window():
    model = lm(Sinks(SlidingWindow(7), 2), max_len=128)
    sizes = []
    for length in (30, 120):
        cache = model.make_cache()
        with torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
            for _ in range(length - 4):
                model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        sizes.append(cache.bytes())
    assert sizes[0] == sizes[1] == 2 * 2 * (2 + 8) * 8 * 8 * 2  # layers, k/v, slots, head_dim, float64, kv heads
    full = lm(Causal(), max_len=128).make_cache(capacity=120)
    assert all(isinstance(c, KVCache) and c.capacity == 120 for c in full)


def test_generate_and_cached_forward_refuse_bad_input():
    model = lm(Causal(), max_len=20)
    prompt = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(ShapeError, match="exceeds max_len 20"):
        model.generate(prompt, 16)
    for bad, match in [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                       (dict(max_new_tokens=-1), "max_new_tokens")]:
        arguments = dict(max_new_tokens=3, **bad) if "max_new_tokens" not in bad else bad
        with pytest.raises(ShapeError, match=match):
            model.generate(prompt, **arguments)
    with pytest.raises(ShapeError, match="prompt"):
        model.generate(torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(CacheError, match="make_cache"):
        model(prompt, cache=[KVCache()])
    cache = model.make_cache()
    with torch.no_grad():
        model(prompt, cache=cache)
        cache[0].append(*(torch.zeros(1, 2, 1, 8, dtype=torch.float64),) * 2)
        with pytest.raises(CacheError, match="different numbers of tokens"):
            model(prompt[:, :1], cache=cache)
    assert isinstance(cache, ModelCache)
    with pytest.raises(ShapeError, match="reach position 22 > max_len 20"):
        model(torch.zeros(1, 16, dtype=torch.long), cache=_filled(model, 6))


def _filled(model, length):
    cache = model.make_cache()
    with torch.no_grad():
        model(torch.zeros(1, length, dtype=torch.long), cache=cache)
    return cache
