"""Command line: ``multihead list``, ``multihead bench``, ``multihead arena`` and ``multihead inspect``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from . import catalog
from .bench.implementations import known as known_peers
from .bench.runner import BenchSettings, run_bench
from .errors import MultiheadError


def _csv(kind):
    return lambda text: [kind(part) for part in text.split(",") if part]


def _costs(args) -> int:
    from .heads.costs import CostSettings, cost_rows, markdown_costs

    settings = CostSettings(dim=args.dim, heads=args.heads, seq_len=args.seq_len,
                            dtype=getattr(torch, args.dtype))
    if args.markdown:
        print(markdown_costs(settings))
        return 0
    table = Table(title=f"topology costs: dim={settings.dim}, heads={settings.heads}, "
                        f"seq_len={settings.seq_len}, cache in {args.dtype}")
    for column in ("variant", "parameters", "attention GFLOPs", "vs MHA", "KV cache B/token", "vs MHA", "note"):
        table.add_column(column, justify="left" if column in ("variant", "note") else "right")
    for r in cost_rows(settings):
        table.add_row(r["variant"], f"{r['params']:,}", f"{r['attention_flops'] / 1e9:.3f}",
                      f"{r['flops_vs_mha']:.3g}", f"{r['kv_cache_bytes']:,}", f"{r['cache_vs_mha']:.3g}",
                      r["note"])
    Console().print(table)
    return 0


def _seeds(args) -> int:
    from . import coverage

    if args.markdown:
        print(coverage.counts_table())
        return 0
    table = Table(title=f"{coverage.summary_line()} (every row: docs/coverage.md)")
    for column in ("family", "papers", "implemented", "out of scope", "missing"):
        table.add_column(column, justify="left" if column == "family" else "right")
    for family, c in coverage.counts().items():
        table.add_row(f"{family}. {coverage.FAMILIES[family]}", str(sum(c.values())), str(c[coverage.IMPLEMENTED]),
                      str(c[coverage.OUT_OF_SCOPE]), str(c[coverage.MISSING]))
    t = coverage.totals()
    table.add_row("all", str(len(coverage.ROWS)), str(t[coverage.IMPLEMENTED]), str(t[coverage.OUT_OF_SCOPE]),
                  str(t[coverage.MISSING]))
    Console(width=120).print(table)
    return 0


def _list(args) -> int:
    if args.costs:
        return _costs(args)
    if args.seeds:
        return _seeds(args)
    if args.markdown:
        print(catalog.markdown_table())
        return 0
    table = Table(title="multihead variants")
    for column in ("variant", "family", "what it changes", "paper"):
        table.add_column(column)
    for v in catalog.CATALOG.values():
        if args.family in (None, v.family):
            table.add_row(v.name, v.family, v.summary, v.paper.cite())
    Console().print(table)
    return 0


def _bench(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = sorted(set((args.lengths or []) + [side * side for side in args.grids]))
    settings = BenchSettings(lengths=lengths or BenchSettings().lengths, only=args.only, peers=args.peers, batch=args.batch,
                             dim=args.dim, heads=args.heads, dtype=args.dtype, device=args.device,
                             repeats=args.repeats, seed=args.seed)
    run_bench(settings, out_dir=args.out)
    return 0


def _inspect(args) -> int:
    from .analysis.report import hf_subject, inspect_model, small_subject

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "small":
        subject = small_subject(tokens=args.tokens, seed=args.seed, backend=args.backend)
    else:
        subject = hf_subject(args.model, args.text)
    inspect_model(subject, args.out, layers=args.layers)
    print(f"wrote {args.out}/index.html")
    return 0


def _arena(args) -> int:
    from .arena import QUICK, ArenaSettings, run_arena

    if args.threads:
        torch.set_num_threads(args.threads)
    base = QUICK if args.quick else ArenaSettings()
    chosen = {"tasks": args.task, "variants": args.variants, "steps": args.steps, "seeds": args.seeds,
              "batch": args.batch, "dim": args.dim, "depth": args.depth, "heads": args.heads, "lr": args.lr,
              "length": args.length}
    settings = replace(base, **{k: v for k, v in chosen.items() if v is not None})
    run_arena(settings, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multihead", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="print the catalog of variants")
    p.add_argument("--markdown", action="store_true", help="as a Markdown table (for the README)")
    p.add_argument("--family", choices=sorted({v.family for v in catalog.CATALOG.values()}))
    what = p.add_mutually_exclusive_group()
    what.add_argument("--costs", action="store_true",
                      help="parameters, attention FLOPs and KV-cache bytes per token of every topology")
    what.add_argument("--seeds", action="store_true",
                   help="coverage of the seed papers per family: implemented / out of scope / missing "
                        "(every row: docs/coverage.md)")
    p.add_argument("--dim", type=int, default=512, help="model width for --costs")
    p.add_argument("--heads", type=int, default=8, help="heads for --costs")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length for --costs")
    p.add_argument("--dtype", default="bfloat16", help="cache dtype for --costs")
    p.set_defaults(run=_list)

    defaults = BenchSettings()
    p = sub.add_parser("bench", help="time, memory and GFLOP/s of every variant beside its peers")
    p.add_argument("--lengths", type=_csv(int), default=None,
                   help=f"comma-separated token counts (default {','.join(map(str, defaults.lengths))}; "
                        f"2-D variants need squares)")
    p.add_argument("--grids", type=_csv(int), default=[],
                   help="comma-separated grid sides: side x side tokens, added to --lengths")
    p.add_argument("--only", type=_csv(str), default=[],
                   help="comma-separated variant names or families, or the read-out and cross modules "
                        "attentive_probe, pointer, tnt, dcal_glca, dcal_pwca, kmax, pem, danet_position, danet_channel "
                        "(default: all of them)")
    p.add_argument("--peers", type=_csv(str), default=defaults.peers,
                   help=f"comma-separated, from {','.join(known_peers())} (default {','.join(defaults.peers)}; "
                        f"flex compiles per shape and runs forward only on CPU)")
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--dim", type=int, default=defaults.dim)
    p.add_argument("--heads", type=int, default=defaults.heads)
    p.add_argument("--dtype", default=defaults.dtype)
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs after the first call")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="results/bench", help="folder for bench.json and the plots")
    p.set_defaults(run=_bench)

    p = sub.add_parser("inspect", help="per-head attention maps, metrics and importance, with an HTML page")
    p.add_argument("--model", default="small",
                   help="'small' (a generated multihead model), 'minilm' (the packaged all-MiniLM-L6-v2) "
                        "or a Hugging Face model folder")
    p.add_argument("--text", default="The quick brown fox jumps over the lazy dog.",
                   help="input text for a Hugging Face model")
    p.add_argument("--tokens", type=int, default=24, help="generated tokens for the small model")
    p.add_argument("--seed", type=int, default=0, help="seed of the small model and its input")
    p.add_argument("--backend", default="auto", help="backend of the small model")
    p.add_argument("--layers", type=_csv(int), default=None, help="comma-separated layer indices (default all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="results/inspect", help="folder for the plots and index.html")
    p.set_defaults(run=_inspect)
    from .arena import QUICK, ArenaSettings
    from .arena.models import MODELS
    from .arena.tasks import TASKS

    defaults = ArenaSettings()
    p = sub.add_parser("arena", help="train small models that differ only in their attention; compare accuracy")
    p.add_argument("--quick", action="store_true",
                   help=f"tasks {','.join(QUICK.tasks)}, variants {','.join(QUICK.variants)}, {QUICK.seeds} "
                        f"seeds (under 10 minutes on 2 cores); other options override it")
    p.add_argument("--task", type=_csv(str), default=None,
                   help=f"comma-separated, from {','.join(TASKS)} (default {','.join(defaults.tasks)})")
    p.add_argument("--variants", type=_csv(str), default=None,
                   help=f"comma-separated catalog names (full = mha) or the models {','.join(MODELS)} "
                        f"(default {','.join(defaults.variants)})")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the task's own: "
                        + ", ".join(f"{name} {task.steps}" for name, task in TASKS.items()) + ")")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per variant (default {defaults.seeds})")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--length", type=int, default=None,
                   help="tokens of the sequence tasks (default: each task's own; ListOps up to 2048)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="results/arena", help="folder for arena.json and arena.png")
    p.set_defaults(run=_arena)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MultiheadError as error:
        print(f"multihead {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
