"""Linear and recurrent attention: time and peak memory of each variant's chunked form against
causal softmax attention (SDPA) as N grows.

Writes ``linear_scaling.json`` (after every case, so a run cut short keeps what it measured),
``linear_scaling.md`` (the table and ratios that ``docs/performance.md`` quotes) and
``linear_scaling.png`` into ``--out``. Forward passes without gradients, B=1, H=8, D=64, fp32.
Every ratio compares figures measured side by side in this one run; times are the best of up to
``--repeats`` runs within ``--budget`` seconds per case.

    python benchmarks/linear_scaling.py --out results/linear            # 1k .. 256k tokens
    python benchmarks/linear_scaling.py --quick --out results/linear    # 1k .. 4k, a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from multihead.bench.measure import peak_memory, time_call
from multihead.linear import (chunked_linear_attention, chunked_prefix_attention, decomposed_manhattan_attention,
                              lightning_decays, retnet_decays)

CHUNKED = ("linear_elu", "slab_linear", "retention", "lightning", "aaren")


def variants(heads: int, chunk: int, slab: int | None = None) -> dict:
    """Each variant's fast form as a function of (q, k, v); ``chunked`` ones must scale linearly.
    ``slab``: tokens per slab of the causal chunked forms (None: their default)."""
    retention = retnet_decays(heads).log().float()
    lightning = lightning_decays(heads).float()
    elu = lambda x: F.elu(x) + 1  # noqa: E731
    causal = {"chunk_size": chunk, "slab_size": slab}
    return {
        "linear_elu": lambda q, k, v: chunked_linear_attention(q, k, v, feature_map=elu, normalize=True, **causal),
        "slab_linear": lambda q, k, v: chunked_linear_attention(q, k, v, feature_map=F.relu, causal=False,
                                                                normalize=True, chunk_size=chunk),
        "retention": lambda q, k, v: chunked_linear_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                                              log_decay=retention, **causal),
        "lightning": lambda q, k, v: chunked_linear_attention(q, k, v, feature_map=F.silu, log_decay=lightning,
                                                              **causal),
        "aaren": lambda q, k, v: chunked_prefix_attention((k @ q[:, :, :1].mT).squeeze(-1) * q.shape[-1] ** -0.5, v,
                                                          **causal),
        "rmt_decomposed": lambda q, k, v: decomposed_manhattan_attention(
            q, k, v, (math.isqrt(q.shape[2]),) * 2, retention),
        "sdpa_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }


def allocator() -> str:
    """How glibc hands out large blocks in this run. By default every block over 32 MiB is mapped
    afresh and its pages fault on first touch, a cost per call that grows with N beside the
    attention itself; ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>`` keeps freed memory for
    reuse, as the caching allocators that PyTorch recommends for CPU (jemalloc, tcmalloc) do."""
    keys = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
    settings = [f"{k}={os.environ[k]}" for k in keys if k in os.environ]
    return "allocator: " + (" ".join(settings) if settings else "glibc defaults")


def measure(fn, repeats: int, budget_s: float) -> dict:
    """Peak memory of one call (timed too); more timed calls while the budget lasts; the best time
    (the machine is shared: the minimum is the least disturbed run)."""
    first = {}

    def timed():
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        first["s"] = time.perf_counter() - start

    peak = peak_memory(timed)
    seconds = [first["s"]]
    if first["s"] * 2 < budget_s and repeats > 1:
        seconds.append(time_call(lambda: timed(), repeats=repeats - 1, warmup=0, budget_s=budget_s).low)
    return {"seconds": min(seconds), "peak_bytes": peak}


def summary(rows: list[dict]) -> dict:
    """Growth 16k -> 64k per variant and the crossover N against causal SDPA."""
    by = {}
    for r in rows:
        by.setdefault(r["variant"], {})[r["tokens"]] = r
    sdpa = by.get("sdpa_causal", {})
    out = {}
    for name, points in by.items():
        if name == "sdpa_causal":
            continue
        item = {}
        if 16384 in points and 65536 in points:
            item["time_64k_over_16k"] = points[65536]["seconds"] / points[16384]["seconds"]
        if 65536 in points and 262144 in points:
            item["time_256k_over_64k"] = points[262144]["seconds"] / points[65536]["seconds"]
        both = sorted(n for n in points if n in sdpa)
        item["vs_sdpa"] = {n: points[n]["seconds"] / sdpa[n]["seconds"] for n in both}
        faster = [n for n in both if points[n]["seconds"] < sdpa[n]["seconds"]]
        slower = [n for n in both if n not in faster]
        if faster and (not slower or max(slower) < min(faster)):
            below = max(slower) if slower else None
            item["crossover"] = (f"between {below} and {min(faster)}" if below else f"<= {min(faster)}")
        elif not faster:
            item["crossover"] = f"not reached by {max(both)}" if both else "SDPA not measured"
        else:
            item["crossover"] = f"mixed: faster at {faster}, slower at {slower}"
        out[name] = item
    return out


def markdown(rows: list[dict], items: dict, machine: str, skipped: list[str]) -> str:
    lengths = sorted({r["tokens"] for r in rows})
    names = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["tokens"]): r for r in rows}
    lines = [f"Measured on {machine}.", "", "Forward seconds (peak MiB above the inputs):", "",
             "| variant | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for name in names:
        parts = []
        for n in lengths:
            r = cell.get((name, n))
            parts.append(f"{r['seconds']:.3f} ({(r['peak_bytes'] or 0) / 2**20:.0f})" if r else "-")
        lines.append(f"| {name} | " + " | ".join(parts) + " |")
    lines += ["", "| variant | time 64k / 16k (<= 4.5 for chunked forms) | time 256k / 64k | "
              "time / causal SDPA at each N | crossover N vs causal SDPA |", "|---|---|---|---|---|"]
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    for name, i in items.items():
        vs = ", ".join(f"{n}: {x:.2f}" for n, x in i["vs_sdpa"].items()) or "n/a"
        lines.append(f"| {name} | {fmt(i.get('time_64k_over_16k'))} | {fmt(i.get('time_256k_over_64k'))} | "
                     f"{vs} | {i['crossover']} |")
    if skipped:
        lines += ["", "Not measured: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5))
    for name in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["tokens"])
        style = "k--s" if name == "sdpa_causal" else "-o"
        n = [r["tokens"] for r in pts]
        ax_t.plot(n, [r["seconds"] for r in pts], style, label=name)
        ax_m.plot(n, [max(r["peak_bytes"] or 0, 1) / 2**20 for r in pts], style, label=name)
    for ax, label in ((ax_t, "forward time (s)"), (ax_m, "forward peak above inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_title("chunked linear forms vs causal SDPA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/linear_scaling")
    parser.add_argument("--quick", action="store_true", help="N = 1k, 2k, 4k only")
    parser.add_argument("--lengths", default="1024,2048,4096,16384,65536,262144")
    parser.add_argument("--only", default="", help="comma-separated variant names to keep")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--slab-size", type=int, default=None,
                        help="tokens per slab of the causal chunked forms (default: theirs; a huge value: one slab)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of repeated timing per case")
    parser.add_argument("--sdpa-limit", type=int, default=65536,
                        help="largest N for causal SDPA (quadratic: 256k would take ~16x the 64k time)")
    parser.add_argument("--grid-limit", type=int, default=65536,
                        help="largest N for RMT's decomposed form (its row attention holds H x side^3 weights)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [1024, 2048, 4096] if args.quick else [int(n) for n in args.lengths.split(",")]
    table = variants(args.heads, args.chunk_size, args.slab_size)
    names = [n for n in table if not args.only or n in args.only.split(",")]
    machine = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=1 H={args.heads} "
               f"D={args.head_dim} fp32, chunk {args.chunk_size}, slab {args.slab_size or 'default'}, "
               f"forward without gradients, {allocator()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for n in lengths:
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim, generator=gen) for _ in range(3))
        for name in names:
            if name == "sdpa_causal" and n > args.sdpa_limit:
                skipped.append(f"causal SDPA at N = {n} (over --sdpa-limit {args.sdpa_limit})")
                continue
            if name == "rmt_decomposed" and math.isqrt(n) ** 2 != n:
                continue  # a square grid only
            if name == "rmt_decomposed" and n > args.grid_limit:
                skipped.append(f"RMT decomposed at N = {n} (over --grid-limit {args.grid_limit})")
                continue
            result = measure(lambda: table[name](q, k, v), args.repeats, args.budget)
            rows.append({"variant": name, "tokens": n, **result})
            print(f"{name:>15} N={n:>7}: {result['seconds']:.4f} s, "
                  f"peak {(result['peak_bytes'] or 0) / 2**20:.0f} MiB", flush=True)
            items = summary(rows)
            (out / "linear_scaling.json").write_text(json.dumps(
                {"machine": machine, "rows": rows, "summary": items, "skipped": skipped}, indent=2))
            (out / "linear_scaling.md").write_text(markdown(rows, items, machine, skipped))
        del q, k, v
    plot(rows, out / "linear_scaling.png")
    print((out / "linear_scaling.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
