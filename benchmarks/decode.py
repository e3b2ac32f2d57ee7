"""Decoding speed and cache memory of ``TransformerLM`` with a KV cache (``multihead.cache``).

Greedy decoding of ``--tokens`` tokens after a ``--prompt``-token prompt, batch 1, by a
``TransformerLM`` whose blocks use ``Causal()`` (a cache of every key), ``SlidingWindow(w)`` (a
rolling window of ``w + 1`` keys) or ``Sinks(SlidingWindow(w - s), s)`` (StreamingLLM: ``s`` sinks
and a window, the same number of keys), against

* recomputing the whole sequence for every new token (no cache), timed over the first
  ``--recompute-tokens`` tokens (its cost grows with the sequence; the cached runs are quoted over
  the same first tokens beside it);
* Hugging Face's ``generate`` on a random-init ``LlamaForCausalLM`` of about the same size (same
  width, depth, heads and vocabulary; SwiGLU MLP of ``2/3`` the width so the parameters match the
  GELU MLP; RoPE instead of learned positions), with its ``DynamicCache``, through SDPA and through
  ``attn_implementation="multihead"``.

Then a ``--prefill``-token forward of a random-init Mistral with a sliding window of
``--prefill-window``, transformers' SDPA path (a dense ``N x N`` mask) against
``attn_implementation="multihead"`` (``Causal() & SlidingWindow``, which ``auto`` runs block-sparse):
time and peak resident memory growth, each in a fresh process.

Rounds run the variants interleaved; each step keeps its fastest round (interference from other
work on a shared machine only adds time), Hugging Face's generate its fastest whole run. Prints a markdown table and
writes ``decode.json`` to ``--out``.

    python benchmarks/decode.py            # 2048 tokens, about 2 minutes on 2 cores
    python benchmarks/decode.py --quick    # 256 tokens
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from multihead.models import TransformerLM
from multihead.nn import MultiHeadAttention
from multihead.patterns import Causal, Sinks, SlidingWindow


def build_lm(args, pattern) -> TransformerLM:
    torch.manual_seed(0)
    builder = lambda dim, heads, n: MultiHeadAttention(dim, heads, pattern=pattern)
    return TransformerLM(args.vocab, args.dim, args.depth, args.heads, attention=builder,
                         max_len=args.prompt + args.tokens).eval()


@torch.no_grad()
def decode(model: TransformerLM, prompt: torch.Tensor, tokens: int, use_cache: bool):
    """Greedy decoding; returns (seconds after each token, cache bytes at the end, tokens)."""
    cache = model.make_cache(capacity=prompt.shape[1] + tokens) if use_cache else None
    sequence = prompt
    times = []
    begin = time.perf_counter()
    logits = model(prompt, cache=cache)[:, -1]
    for step in range(tokens):
        chosen = logits.argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, chosen], 1)
        times.append(time.perf_counter() - begin)
        if step + 1 < tokens:
            logits = (model(chosen, cache=cache) if use_cache else model(sequence))[:, -1]
    return times, (cache.bytes() if use_cache else 0), sequence


def hf_llama(args, implementation: str):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=round(args.dim * 4 * 2 / 3),
        num_hidden_layers=args.depth, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.prompt + args.tokens, attn_implementation=implementation)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@torch.no_grad()
def hf_decode(model, prompt: torch.Tensor, tokens: int):
    begin = time.perf_counter()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                         min_new_tokens=tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                         return_dict_in_generate=True)
    seconds = time.perf_counter() - begin
    cache = out.cache if "cache" in out else out.past_key_values
    held = 0
    for layer in getattr(cache, "layers", []):
        held += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
    return [seconds], held, out.sequences


def _prefill_child(args, implementation: str, queue) -> None:
    """In a fresh process: one forward of a ``--prefill``-token prompt through a random-init Mistral
    with a sliding window; puts (seconds, peak RSS growth in bytes, the logits' checksum)."""
    import multihead.integrations.hf  # noqa: F401  (registers "multihead")
    import transformers

    torch.set_num_threads(args.threads)
    config = transformers.MistralConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=round(args.dim * 4 * 2 / 3),
        num_hidden_layers=args.depth, num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 4),
        max_position_embeddings=args.prefill, sliding_window=args.prefill_window, attn_implementation=implementation)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    assert model.config._attn_implementation == implementation
    ids = torch.randint(0, args.vocab, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for call in range(2):  # memory: the first call (the allocator holds nothing yet); time: the faster
            rss = _rss("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
            begin = time.perf_counter()
            hidden = model.model(input_ids=ids).last_hidden_state
            times.append(time.perf_counter() - begin)
            if call == 0:
                peak = _rss("VmHWM") - rss
    queue.put((min(times), peak, float(hidden[0, -1].double().sum())))


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def prefill(args) -> list[dict]:
    """Mistral's sliding-window prefill: transformers' sdpa path against attn_implementation='multihead'."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rows = []
    for implementation in ("sdpa", "multihead"):
        queue = context.Queue()
        child = context.Process(target=_prefill_child, args=(args, implementation, queue))
        child.start()
        seconds, peak, checksum = queue.get()
        child.join()
        rows.append(dict(implementation=implementation, tokens=args.prefill, window=args.prefill_window,
                         seconds=seconds, peak_bytes=peak, checksum=checksum))
    return rows


def decode_table(args) -> list[dict]:
    """The decoding rows (printed as a markdown table)."""
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    w, s = args.window, args.sinks
    variants = {
        "Causal, KV cache": (build_lm(args, Causal()), True, args.tokens),
        f"SlidingWindow({w}), rolling cache": (build_lm(args, SlidingWindow(w)), True, args.tokens),
        f"Sinks(SlidingWindow({w - s}), {s}), rolling cache": (build_lm(args, Sinks(SlidingWindow(w - s), s)),
                                                               True, args.tokens),
        "Causal, recompute every step": (build_lm(args, Causal()), False, args.recompute_tokens),
    }
    if not args.no_hf:
        import multihead.integrations.hf  # noqa: F401  (registers "multihead")

        variants["HF Llama generate (sdpa, DynamicCache)"] = (hf_llama(args, "sdpa"), None, args.tokens)
        variants["HF Llama generate (multihead, DynamicCache)"] = (hf_llama(args, "multihead"), None, args.tokens)
    for model, use_cache, _ in variants.values():  # warm up
        if use_cache is None:
            hf_decode(model, prompt, 8)
        else:
            decode(model, prompt, 8, use_cache)
    best: dict[str, tuple] = {}
    for _ in range(args.rounds):
        for name, (model, use_cache, tokens) in variants.items():
            result = hf_decode(model, prompt, tokens) if use_cache is None else decode(model, prompt, tokens, use_cache)
            if name in best:  # each step's fastest round: interference from other work only adds time
                steps = torch.minimum(torch.tensor(result[0]).diff(prepend=torch.zeros(1, dtype=torch.float64)),
                                      torch.tensor(best[name][0]).diff(prepend=torch.zeros(1, dtype=torch.float64)))
                result = (steps.cumsum(0).tolist(), *result[1:])
            best[name] = result
    rows = []
    r = args.recompute_tokens
    for name, (model, use_cache, tokens) in variants.items():
        times, held, sequence = best[name]
        params = sum(p.numel() for p in model.parameters())
        row = dict(variant=name, tokens=tokens, seconds=times[-1], tokens_per_s=tokens / times[-1],
                   cache_bytes=held, params=params)
        if use_cache:
            row["first_tokens_per_s"] = r / times[r - 1]
        rows.append(row)
    recompute = next(row for row in rows if "recompute" in row["variant"])
    causal = rows[0]
    print(f"# decode: batch 1, prompt {args.prompt}, {args.tokens} new tokens, dim {args.dim}, depth {args.depth}, "
          f"heads {args.heads}, vocab {args.vocab}, float32, {args.threads} thread(s), each step the fastest of {args.rounds} round(s)\n")
    print(f"| variant | params | tokens | tokens/s | x Causal cache | tokens/s over the first {r} | cache at the end |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        first = row.get("first_tokens_per_s", row["tokens_per_s"] if row is recompute else None)
        print(f"| {row['variant']} | {row['params'] / 1e6:.2f} M | {row['tokens']} | {row['tokens_per_s']:.1f} | "
              f"{row['tokens_per_s'] / causal['tokens_per_s']:.2f} | "
              + (f"{first:.1f} ({first / recompute['tokens_per_s']:.1f}x recompute)" if first else "-") + " | "
              + (f"{row['cache_bytes'] / 2 ** 20:.2f} MiB" if row["cache_bytes"] else "-") + " |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--recompute-tokens", type=int, default=256)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: batch-1 decoding is latency-bound)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face rows")
    parser.add_argument("--prefill", type=int, default=8192, help="tokens of the Mistral prefill (0: skip it)")
    parser.add_argument("--prefill-window", type=int, default=512)
    parser.add_argument("--only-prefill", action="store_true", help="skip the decoding table")
    parser.add_argument("--quick", action="store_true", help="256 tokens, 64 recomputed, one round")
    parser.add_argument("--out", default="results/decode")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.recompute_tokens, args.rounds, args.prefill = 256, 64, 1, min(args.prefill, 2048)
    args.recompute_tokens = min(args.recompute_tokens, args.tokens)
    torch.set_num_threads(args.threads)
    rows = [] if args.only_prefill else decode_table(args)
    prefill_rows = prefill(args) if args.prefill and not args.no_hf else []
    if prefill_rows:
        sdpa = prefill_rows[0]
        print(f"\n# prefill: random-init Mistral (dim {args.dim}, depth {args.depth}, heads {args.heads}, kv heads "
              f"{max(1, args.heads // 4)}), {args.prefill} tokens, sliding_window={args.prefill_window}, faster of 2 calls, memory of the first\n")
        print("| attn_implementation | seconds | x sdpa | peak memory growth | final hidden state checksum |")
        print("|---|---|---|---|---|")
        for row in prefill_rows:
            print(f"| {row['implementation']} | {row['seconds']:.2f} | {row['seconds'] / sdpa['seconds']:.2f} | "
                  f"{row['peak_bytes'] / 2 ** 20:.0f} MiB | {row['checksum']:.4f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, machine=platform.machine(), processor=platform.processor(),
                settings={k: v for k, v in vars(args).items()})
    (out / "decode.json").write_text(json.dumps(dict(meta=meta, rows=rows, prefill=prefill_rows), indent=2))
    print(f"\nwrote {out / 'decode.json'}")


if __name__ == "__main__":
    main()
