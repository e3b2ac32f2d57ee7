"""multihead.cache: decoding token by token with a KV cache equals recomputing the whole sequence,
for every pattern that can be decoded causally; rolling windows and sinks bound the memory; the
patterns and inputs that cannot be decoded are refused with the reason."""

from __future__ import annotations

import math

import pytest
import torch

import multihead.cache as cache_module
from multihead.cache import CacheError, HeadSplitCache, KVCache, Retention, retention
from multihead.heads import (CompressedAttention, LatentCache, LowRankAttention, MultiHeadLatentAttention,
                             SingleHeadAttention, TalkingHeadsAttention)
from multihead.nn import MultiHeadAttention, RelativeAttention
from multihead.normalizers import Sigmoid
from multihead.patterns import (BlockLocal, Causal, Dilated, Documents, Full, GlobalTokens, PerHead, PrefixLM,
                                Routing, Sinks, SlidingWindow, TopK)
from multihead.scores import ALiBi, RoPE

N, DIM, HEADS = 40, 32, 4

PATTERNS = {
    "causal": lambda: Causal(),
    "sliding_window": lambda: SlidingWindow(5) & Causal(),
    "dilated": lambda: Dilated(3, 2) & Causal(),
    "prefix_lm": lambda: PrefixLM(8),  # the prefill (10 tokens) covers the prefix
    "global_tokens": lambda: (GlobalTokens(2) | SlidingWindow(4)) & Causal(),
    "block_local": lambda: BlockLocal(6) & Causal(),
    "documents": lambda: Documents(torch.tensor([0, 7, 20, 33, N])) & Causal(),
    "documents_per_row": lambda: Documents(doc_ids=torch.tensor([[0] * 10 + [1] * 22 + [2] * 8,
                                                                 [0] * 4 + [1] * 30 + [2] * 6])) & Causal(),
    "topk": lambda: TopK(4) & Causal(),
    "topk_window": lambda: TopK(3) & SlidingWindow(8),
    "sinks": lambda: Sinks(SlidingWindow(4), 3),
    "per_head": lambda: PerHead([SlidingWindow(2), SlidingWindow(6), Causal(), SlidingWindow(3)]),
}


def decode(module, x, cache, splits=(10, 13)):
    """A prompt of ``splits[0]`` tokens, a chunk up to ``splits[1]``, then one token at a time."""
    outs = [module(x[:, : splits[0]], cache=cache), module(x[:, splits[0]: splits[1]], cache=cache)]
    outs += [module(x[:, t: t + 1], cache=cache) for t in range(splits[1], x.shape[1])]
    return torch.cat(outs, 1)


def build(kind, pattern, score=None, **options):
    torch.manual_seed(0)
    if kind == "mla":
        module = MultiHeadLatentAttention(DIM, HEADS, pattern=pattern, score=score, **options)
        return module.double().eval(), module.new_cache()
    module = MultiHeadAttention(DIM, HEADS, kv_heads=2, pattern=pattern, position=RoPE(DIM // HEADS),
                                score=score, **options)
    return module.double().eval(), KVCache.for_pattern(pattern)


@pytest.mark.parametrize("kind", ["gqa", "mla"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_decoding_equals_recomputing(name, kind):
    pattern = PATTERNS[name]()
    module, cache = build(kind, pattern)
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(x)
        got = decode(module, x, cache)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert len(cache) == N


@pytest.mark.parametrize("name", ["causal", "sliding_window", "sinks", "per_head", "documents", "documents_per_row"])
def test_position_scores_see_the_absolute_positions_of_the_gathered_keys(name):
    """ALiBi reads key positions: with a rolling ring the slots are out of order."""
    module, cache = build("gqa", PATTERNS[name](), score=ALiBi(HEADS))
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(decode(module, x, cache), module(x), atol=1e-12, rtol=1e-10)


def test_talking_heads_and_sigmoid_with_a_bias_decode():
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    talking = TalkingHeadsAttention(DIM, HEADS, pattern=SlidingWindow(6)).double().eval()
    with torch.no_grad():
        talking.pre_mix.add_(0.1 * torch.randn(HEADS, HEADS, dtype=torch.float64))
    sigmoid, _ = build("gqa", Causal(), normalizer=Sigmoid(bias=-math.log(N)))
    for module in (talking, sigmoid):
        with torch.no_grad():
            torch.testing.assert_close(decode(module, x, KVCache.for_pattern(module.pattern)), module(x),
                                       atol=1e-12, rtol=1e-10)


def test_key_padding_covers_the_cached_and_the_new_keys():
    module, cache = build("gqa", SlidingWindow(6))
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    padding = torch.zeros(2, N, dtype=torch.bool)
    padding[0, 2:5] = padding[1, 15:17] = True
    with torch.no_grad():
        want = module(x, key_padding_mask=padding)
        outs = [module(x[:, :10], cache=cache, key_padding_mask=padding[:, :10])]
        outs += [module(x[:, t:t + 1], cache=cache, key_padding_mask=padding[:, :t + 1]) for t in range(10, N)]
    torch.testing.assert_close(torch.cat(outs, 1), want, atol=1e-12, rtol=1e-10)
    with pytest.raises(CacheError, match="key_padding_mask"):
        module(x[:, :1], cache=cache, key_padding_mask=padding[:, :5])


def test_gradients_flow_through_a_growing_cache():
    module, _ = build("gqa", SlidingWindow(6) & Causal())
    x = torch.randn(2, 20, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    module(x).square().sum().backward()
    want = x.grad.clone(), module.q_proj.weight.grad.clone()
    x.grad = None
    module.zero_grad()
    decode(module, x, KVCache(), splits=(5, 8)).square().sum().backward()
    torch.testing.assert_close((x.grad, module.q_proj.weight.grad), want)
    with pytest.raises(CacheError, match="no_grad"):  # a ring is written in place
        module(x[:, :3], cache=KVCache(window=8))


def test_a_step_reads_only_the_keys_its_pattern_names(monkeypatch):
    """One query against the keys of its intervals: a view of the ring for a window (no mask over
    the cache), the kept positions for a dilated window, the sinks and the window for StreamingLLM."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((k.shape[2], attn_mask, k.data_ptr()))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(cache_module.F, "scaled_dot_product_attention", spy)
    x = torch.randn(1, 60, DIM, dtype=torch.float64)
    for pattern, keys, kept in [(Causal(), 60, 60), (SlidingWindow(7) & Causal(), 8, 8),
                                (Dilated(3, 4) & Causal(), 4, 13), (Sinks(SlidingWindow(5), 2), 8, 8)]:
        module, cache = build("gqa", pattern)
        with torch.no_grad():
            module(x[:, :59], cache=cache)
            seen.clear()
            module(x[:, 59:], cache=cache)
        (width, mask, pointer), = seen
        assert (width, mask, cache.slots) == (keys, None, kept if cache.window else cache.slots)
        # one run of slots is read in place (a view of the buffer); the dilated keys are gathered
        assert (pointer == cache.k.data_ptr()) == (keys != 4)


def test_rolling_window_memory_is_bounded_by_the_window():
    module, _ = build("gqa", Sinks(SlidingWindow(7), 4))
    sizes = {}
    for length in (30, 120):
        cache = KVCache.for_pattern(module.pattern)
        x = torch.randn(2, length, DIM, dtype=torch.float64)
        with torch.no_grad():
            module(x[:, :5], cache=cache)
            for t in range(5, length):
                module(x[:, t:t + 1], cache=cache)
        sizes[length] = cache.bytes()
    assert (cache.window, cache.sinks, cache.slots) == (8, 4, 12)
    assert sizes[30] == sizes[120] == 2 * 2 * 12 * (DIM // HEADS) * 8 * 2  # k and v, float64
    latent = MultiHeadLatentAttention(DIM, HEADS, pattern=SlidingWindow(7)).new_cache()
    assert isinstance(latent, LatentCache) and latent.window == 8


def test_per_head_windows_keep_a_window_per_run_of_heads():
    """MoA-style spans: heads 0-1 see 3 keys, heads 2-3 see 10; each run of key/value heads keeps
    its own ring, and decoding still equals recomputing (ALiBi reads each run's own heads)."""
    pattern = PerHead([SlidingWindow(2)] * 2 + [SlidingWindow(9)] * 2) & Causal()
    torch.manual_seed(0)
    module = MultiHeadAttention(DIM, HEADS, kv_heads=2, pattern=pattern, position=RoPE(DIM // HEADS),
                                score=ALiBi(HEADS)).double().eval()
    cache = module.new_cache()
    assert isinstance(cache, HeadSplitCache) and [run[-1].window for run in cache.runs] == [3, 10]
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(decode(module, x, cache), module(x), atol=1e-12, rtol=1e-10)
    head_dim = DIM // HEADS
    assert cache.bytes() == 2 * 2 * (3 + 10) * head_dim * 8  # k and v, batch 2, one kv head per run
    shared = KVCache.for_pattern(pattern)
    with torch.no_grad():
        decode(module, x, shared)
    assert shared.bytes() == 2 * 2 * 2 * 10 * head_dim * 8 > cache.bytes()
    grouped = MultiHeadAttention(DIM, HEADS, kv_heads=1, pattern=pattern).double()
    assert isinstance(grouped.new_cache(), KVCache)  # runs that split a key/value head share one ring
    with pytest.raises(CacheError, match="built for"):
        MultiHeadAttention(DIM, HEADS, kv_heads=2, pattern=Causal()).double()(x[:, :3], cache=module.new_cache())


def test_ring_keeps_the_sinks_and_the_last_window_in_order():
    cache = KVCache(window=5, sinks=2)
    for chunk in ([0, 1, 2], [3], list(range(4, 13)), [13], [14]):
        values = torch.tensor(chunk, dtype=torch.float64).view(1, 1, -1, 1)
        cache.append(values, values)
        k, v, positions = cache.ordered()
        last = chunk[-1] + 1
        expected = list(range(min(2, last))) + list(range(max(2, last - 5), last))
        assert positions.tolist() == expected and k.flatten().tolist() == expected
    assert cache.slots == 7 and len(cache) == 15


def test_retention_follows_the_pattern():
    assert retention(Causal()) == Retention()
    assert retention(SlidingWindow(8) & Causal()) == Retention(0, 9)
    assert retention(Sinks(SlidingWindow(8), 4) & Causal()) == Retention(4, 9)
    assert retention((GlobalTokens(2) | SlidingWindow(4)) & Causal()) == Retention(2, 5)
    assert retention(Dilated(3, 2) & Causal()) == Retention(0, 7)
    assert retention(BlockLocal(16) & Causal()) == Retention(0, 16)
    assert retention(TopK(4) & SlidingWindow(10)) == Retention(0, 11)
    assert retention(PerHead([SlidingWindow(2), SlidingWindow(9)])) == Retention(0, 10)
    assert retention(PerHead([SlidingWindow(2), Causal()])) == Retention()
    assert retention(PrefixLM(4)) == Retention()


@pytest.mark.parametrize("pattern, prefill", [
    (Full(), 10), (SlidingWindow(3, 3), 10), (GlobalTokens(2) | SlidingWindow(3), 10), (Dilated(2, 2), 10),
    (PrefixLM(12), 10), (TopK(3), 10)])
def test_patterns_that_look_ahead_cannot_be_decoded(pattern, prefill):
    module, cache = build("gqa", pattern)
    x = torch.randn(1, 20, DIM, dtype=torch.float64)
    with pytest.raises(CacheError, match="cannot be decoded causally: the query at position"):
        with torch.no_grad():
            module(x[:, :prefill], cache=cache)
            for t in range(prefill, 20):
                module(x[:, t:t + 1], cache=cache)


def test_what_cannot_decode_at_all_says_why():
    x = torch.randn(1, 8, DIM)
    cases = [(MultiHeadAttention(DIM, HEADS, pattern=Routing(2) & Causal()), "content"),
             (MultiHeadAttention(DIM, HEADS, pattern=Causal(), normalizer="sigmoid"), "bias"),
             (RelativeAttention(DIM, HEADS, max_distance=4, pattern=Causal()), "score from the queries"),
             (LowRankAttention(DIM, HEADS, pattern=Causal()), "pooling form")]
    for module, reason in cases:
        assert reason in module.cache_refusal()
        with pytest.raises(CacheError, match=reason):
            module(x, cache=KVCache())
    assert "GroupNorm" in SingleHeadAttention(DIM).cache_refusal()

    class Shifted(MultiHeadAttention):  # mixes tokens in project: decoding would silently differ
        def project(self, x, context, **kwargs):
            q, k, v = super().project(x, context, **kwargs)
            return q, k.roll(1, 2), v

    with pytest.raises(CacheError, match="overrides project.*decodes_with_cache"):
        Shifted(DIM, HEADS, pattern=Causal())(x, cache=KVCache())
    Shifted.decodes_with_cache = True  # the subclass's word, which the catalog test checks for its variants
    Shifted(DIM, HEADS, pattern=Causal())(x, cache=KVCache())


@pytest.mark.parametrize("kv_heads", [HEADS, 2])
def test_compressed_attention_decodes_with_its_convolution_state(kv_heads):
    """CCA's causal convolutions over tokens continue from the last inputs of each stage."""
    torch.manual_seed(0)
    module = CompressedAttention(DIM, HEADS, kv_heads, compression=2, conv_kernel=3, pattern=SlidingWindow(7)).double().eval()
    with torch.no_grad():
        for stage in (*module.q_conv, *module.k_conv):
            stage.conv.weight.normal_(0, 0.5)  # not the identity they start as
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    cache = module.new_cache()
    with torch.no_grad():
        torch.testing.assert_close(decode(module, x, cache), module(x), atol=1e-12, rtol=1e-10)
        cache.reset()  # a new sequence starts from zero states
        torch.testing.assert_close(decode(module, x.flip(1), cache), module(x.flip(1)), atol=1e-12, rtol=1e-10)


def test_a_cache_refuses_inputs_it_does_not_fit():
    module, _ = build("gqa", Causal())
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    cache = KVCache()
    with torch.no_grad():
        module(x[:, :4], cache=cache)
        with pytest.raises(CacheError, match="batch size 2 but the new keys/values have 1"):
            module(x[:1, 4:5], cache=cache)
        with pytest.raises(CacheError, match="float64 keys but the new ones are torch.float32"):
            module.float()(x[:, 4:5].float(), cache=cache)
        module.double()
        other = MultiHeadAttention(DIM, HEADS, kv_heads=1).double()
        with pytest.raises(CacheError, match="key/value heads 2 but the new keys/values have 1"):
            other(x[:, 4:5], cache=cache)
        fixed = KVCache(capacity=6)
        module(x[:, :5], cache=fixed)
        module(x[:, 5:6], cache=fixed)
        with pytest.raises(CacheError, match="past the cache's capacity: 7 tokens > capacity=6"):
            module(x[:, 6:7], cache=fixed)
        short = KVCache(window=4)  # Causal needs every key
        module(x[:, :3], cache=short)
        with pytest.raises(CacheError, match="query at position 4 see key 0, which KVCache.* has dropped"):
            for t in range(3, 12):
                module(x[:, t:t + 1], cache=short)
        assert len(short) == 4  # the refused token was not written
        with pytest.raises(CacheError, match="not defined at query positions 8"):
            docs = MultiHeadAttention(DIM, HEADS, pattern=Documents(torch.tensor([0, 3, 8])) & Causal()).double()
            run = KVCache()
            docs(x[:, :8], cache=run)
            docs(x[:, 8:9], cache=run)
        with pytest.raises(CacheError, match="defined for head count 2, but the queries have 4"):
            mismatched = MultiHeadAttention(DIM, HEADS, pattern=PerHead([Causal(), SlidingWindow(2)])).double()
            mismatched(x[:, :1], cache=KVCache())
        with pytest.raises(CacheError, match="LatentCache"):
            MultiHeadLatentAttention(DIM, HEADS).double()(x[:, :2], cache=KVCache())
    for bad in (dict(window=0), dict(sinks=2), dict(window=4, capacity=8), dict(capacity=-1)):
        with pytest.raises(CacheError):
            KVCache(**bad)
