"""``TopK``'s choice of keys on CPU: the native kernel (screened by int8 or bf16 products where it
applies), the kernel screened by bf16 products, without the screen, and the unfused path, against a
dense SDPA forward.

For each case (B=1, H=8, D=64; ``TopK(64)`` alone and under ``Causal()``, ``TopK(16)`` in a
128-key window; float32 and bfloat16) ``TopK(k).resolve`` is timed in interleaved rounds (best of
``--repeats``) four ways:

- ``kernel``: what runs by default, ``top_keys_of_products``; float32 rows that see
  ``select.SCREEN_KEYS`` keys or more are ranked by int8 products first (bf16 ones where int8's
  error bound is too wide, or the CPU lacks AVX-512 VNNI), then rescored in float32;
- ``bf16 screen``: the same kernel screening by bf16 products (float32, where the CPU has them);
- ``no screen``: the same kernel with the screen off (float32 only; it keeps the same keys);
- ``unfused``: ``torch.matmul`` into chunks of logits, then ``top_keys``;

with a dense SDPA forward on the same q, k, v as the yardstick. Ratios are medians of per-round
ratios. Writes ``topk_choice.json`` and ``topk_choice.md`` to ``--out``.

    python benchmarks/topk_choice.py --out results/topk_choice
    python benchmarks/topk_choice.py --quick --out results/topk_choice   # 1k and 4k tokens
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
from rich.progress import track

import multihead as mh
from multihead.backends import native
from multihead.backends.native import select
from multihead.backends.native import describe as native_status
from multihead.bench.measure import time_interleaved
from multihead.bench.tables import markdown_table
from multihead.patterns import Causal, Full, SlidingWindow, TopK

PATTERNS = (("TopK(64)", TopK(64), Full()), ("TopK(64) & Causal()", TopK(64), Causal()),
            ("TopK(16) & SlidingWindow(128, 128)", TopK(16), SlidingWindow(128, 128)))


def _screened(q, k, keep: int, within) -> select.Screened:
    """How many rows the kernel screens for this input, and by what (none without the products or
    below the size)."""
    n = k.shape[2]
    spans = None if isinstance(within, Full) else within.spans(q.shape[2], n, q.device)
    shape = q.shape[:3] + (keep,)
    indices, valid = torch.empty(shape, dtype=torch.long), torch.empty(shape, dtype=torch.bool)
    return select.top_keys_of_products(q, k, keep, None if spans is None else spans.start,
                                       None if spans is None else spans.end, indices, valid)


def measure(tokens: int, name: str, top: TopK, within, dtype, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, tokens, 64, generator=gen).to(dtype) for _ in range(3))

    def choose(**patches):
        def run():
            with mock.patch.multiple(select, **patches) if patches else contextlib.nullcontext():
                top.resolve(q, k, 1.0, within)
        return run

    def dense():
        with torch.no_grad():
            mh.attention(q, k, v, pattern=Full(), backend="sdpa")

    fns = {"kernel": choose(), "unfused": choose(fused_choice=lambda q, k: False), "dense": dense}
    if dtype == torch.float32:
        fns["no screen"] = choose(SCREEN_KEYS=sys.maxsize)
        if "bf16" in select.screens():
            fns["bf16 screen"] = choose(SCREEN_BY="bf16")
    got = time_interleaved(fns, repeats=repeats, warmup=1)
    screened = _screened(q, k, min(top.k, tokens), within)
    row = {"tokens": tokens, "pattern": name, "dtype": str(dtype).removeprefix("torch."),
           "screened_rows": screened.rows, "screened_by": screened.by, "rows": 8 * tokens}
    for path, timing in got.items():
        row[f"{path} s"] = min(timing.samples)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(got[a].samples, got[b].samples))

    row["kernel / unfused"] = ratio("kernel", "unfused")
    row["kernel / dense"] = ratio("kernel", "dense")
    for other in ("no screen", "bf16 screen"):
        if other in got:
            row[f"kernel / {other}"] = ratio("kernel", other)
    return row


COLUMNS = ("tokens", "pattern", "dtype", "rows screened", "kernel s", "bf16 screen s", "no screen s", "unfused s",
           "dense SDPA fwd s", "kernel / bf16 screen", "kernel / no screen", "kernel / unfused", "kernel / dense")


def markdown(rows: list[dict], machine: str) -> str:
    def cell(r, key, spec):
        return format(r[key], spec) if r.get(key) is not None else "-"

    def screened(r):
        return f"{r['screened_rows']} / {r['rows']}" + (f" ({r['screened_by']})" if r["screened_by"] else "")

    cells = [[str(r["tokens"]), f"`{r['pattern']}`", r["dtype"], screened(r),
              *(cell(r, key, ".3f") for key in ("kernel s", "bf16 screen s", "no screen s", "unfused s", "dense s")),
              *(cell(r, key, ".2f") for key in ("kernel / bf16 screen", "kernel / no screen", "kernel / unfused",
                                                 "kernel / dense"))]
             for r in rows]
    return markdown_table(f"Measured on {machine}", "", COLUMNS, COLUMNS[:4], cells) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/topk_choice"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1k and 4k tokens")
    args = parser.parse_args(argv)
    if native.kernel() is None:
        print(f"the native kernel is not available: {native_status()}")
        return 1
    lengths = (1024, 4096) if args.quick else (4096, 16384)
    cases = [(n, p, dtype) for n in lengths for p in PATTERNS for dtype in (torch.float32, torch.bfloat16)
             if dtype == torch.float32 or p[0] == "TopK(64)"]
    rows = [measure(n, name, top, within, dtype, args.repeats)
            for n, (name, top, within), dtype in track(cases, description="measuring")]
    machine = f"{torch.__version__}, {torch.get_num_threads()} threads, B=1 H=8 D=64; {native_status()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "topk_choice.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    text = markdown(rows, machine)
    (args.out / "topk_choice.md").write_text(text)
    print(text)
    print(f"written to {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
