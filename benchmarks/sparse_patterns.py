"""Sparse and local patterns: time and peak memory per backend, against N or grid size.

Writes ``sparse_patterns.json``, ``sparse_patterns.png`` and ``sparse_patterns.md`` (the table of
ratios that ``docs/performance.md`` quotes) into ``--out``. Every ratio compares figures measured
side by side in this one run (as the median of the ratios within each round, where both were
timed in the same rounds). The ratios are those of what ``backend="auto"`` runs ("runs on":
block-sparse, or for routing's clusters the documents backend, one SDPA call per cluster);
block-sparse itself is measured on every pattern and kept in the JSON. Times are the best of
``--repeats`` rounds in which every backend runs once (within a budget per case), so that a
machine whose speed drifts slows all of them alike.

    python benchmarks/sparse_patterns.py --out results/sparse            # the full set (~25 min)
    python benchmarks/sparse_patterns.py --quick --out results/sparse    # small sizes (~1 min)
    python benchmarks/sparse_patterns.py --device cuda --out results/sparse_cuda  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import multihead as mh
from multihead.backends import BACKENDS
from multihead.bench.measure import peak_memory, time_call, time_interleaved
from multihead.patterns import Full, Neighborhood, Pattern, Routing, ShiftedWindow, SlidingWindow, TopK
from multihead.request import make_request


@dataclass(frozen=True)
class Case:
    family: str
    size: str
    tokens: int
    pattern: Pattern


def cases(quick: bool) -> list[Case]:
    lengths = (1024, 4096) if quick else (4096, 16384, 65536)
    grids = ((32, 32),) if quick else ((64, 64), (128, 128))
    out = [Case("sliding_window_128", str(n), n, SlidingWindow(128, 128)) for n in lengths]
    for kernel in (7, 13):
        out += [Case(f"neighborhood_{kernel}x{kernel}", f"{g[0]}x{g[1]}", g[0] * g[1],
                     Neighborhood(kernel, grid=g)) for g in grids]
    out += [Case("swin_8x8_shift4", f"{g[0]}x{g[1]}", g[0] * g[1], ShiftedWindow(8, 4, grid=g)) for g in grids]
    dynamic = (1024, 4096) if quick else (4096, 16384)
    out += [Case("topk_64", str(n), n, TopK(64)) for n in dynamic]
    out += [Case("topk_16_in_window_128", str(n), n, TopK(16) & SlidingWindow(128, 128)) for n in dynamic]
    out += [Case("routing_16", str(n), n, Routing(16)) for n in dynamic]
    return out


def _inputs(n: int, heads: int, head_dim: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, head_dim, generator=gen).to(device) for _ in range(4)]


def _able(backend: str, q, k, v, pattern) -> bool:
    return backend in BACKENDS and BACKENDS[backend].unsupported(make_request(q, k, v, pattern=pattern)) is None


def measure_case(case: Case, heads: int, head_dim: int, repeats: int, dense_limit: int, flex_limit: int,
                 train_backends: list[str], forward_backends: list[str], device: str = "cpu") -> dict:
    q, k, v, grad = _inputs(case.tokens, heads, head_dim, device)
    resolved = make_request(q, k, v, pattern=case.pattern).pattern  # dynamic patterns: this input's
    auto = mh.explain(q, k, v, pattern=case.pattern, show=False).backend  # what the library runs by default
    row: dict = {"family": case.family, "size": case.size, "tokens": case.tokens, "auto": auto,
                 "density": resolved.density(case.tokens, case.tokens), "backends": {}}
    train_backends = train_backends + [auto] * (auto not in train_backends)
    forward_backends = forward_backends + [auto] * (auto not in forward_backends)

    def forward(backend, pattern):
        def run():
            with torch.no_grad():
                mh.attention(q, k, v, pattern=pattern, backend=backend)
        return run

    # Every backend's forward and our forward+backward, timed in rounds (each once per round), so
    # that the machine's drift slows them alike and their ratios stay fair; with them dense SDPA on
    # the full (unmasked) problem, the yardstick for "fraction of pairs x dense" (on its own past
    # dense_limit, where one call takes a minute).
    dense = forward("sdpa", Full())
    timed = {("dense", "sdpa"): dense} if case.tokens <= dense_limit else {}
    if not timed:
        row["dense_sdpa_forward_s"] = time_call(dense, repeats=repeats, warmup=1, budget_s=30).low
    for backend in forward_backends:
        if backend == "sdpa" and case.tokens > dense_limit:
            continue  # a dense N x N mask would not fit
        if backend == "flex" and case.tokens > flex_limit:
            continue
        if backend == "natten" and case.tokens > 4096:
            continue  # on CPU NATTEN runs uncompiled FlexAttention, which materialises N x N logits
        if _able(backend, q, k, v, case.pattern):
            timed[("forward_s", backend)] = forward(backend, case.pattern)
    trainers = {}
    for backend in train_backends:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if not _able(backend, *leaves, case.pattern):
            continue

        def train(backend=backend, leaves=leaves):
            for t in leaves:
                t.grad = None
            mh.attention(*leaves, pattern=case.pattern, backend=backend).backward(grad)

        trainers[backend] = timed[("forward_backward_s", backend)] = train
    timings = time_interleaved(timed, repeats=repeats, warmup=1, budget_s=60)
    for (what, backend), timing in timings.items():
        if what == "dense":
            row["dense_sdpa_forward_s"] = timing.low
            row["dense_sdpa_samples"] = list(timing.samples)
        else:
            entry = row["backends"].setdefault(backend, {})
            entry[what] = timing.low
            entry[what.replace("_s", "_samples")] = list(timing.samples)
    for backend, train in trainers.items():
        entry = row["backends"][backend]
        entry["forward_backward_peak_bytes"] = peak_memory(train, device)
        entry["forward_peak_bytes"] = peak_memory(forward(backend, case.pattern), device)
    return row


def ratios(rows: list[dict]) -> list[dict]:
    """The issue's targets as ratios within this run."""
    out = []
    for r in rows:
        ours = r["backends"].get(r.get("auto", "blocksparse"), {})  # what backend="auto" runs
        flex = r["backends"].get("flex", {})
        fwd = ours.get("forward_s")
        item = {"family": r["family"], "size": r["size"], "runs_on": r.get("auto", "blocksparse"),
                "density": r["density"], "forward_s": fwd,
                "forward_backward_s": ours.get("forward_backward_s"),
                "peak_mib": (ours.get("forward_backward_peak_bytes") or 0) / 2**20}
        item["vs_flex"] = _paired(ours, "forward", flex, "forward")
        dense = {"forward_s": r["dense_sdpa_forward_s"], "forward_samples": r.get("dense_sdpa_samples")}
        vs_dense = _paired(ours, "forward", dense, "forward")
        item["vs_density_x_dense"] = vs_dense / r["density"] if vs_dense else None
        item["train_over_forward"] = _paired(ours, "forward_backward", ours, "forward")
        out.append(item)
    windows = {r["tokens"]: r for r in rows if r["family"] == "sliding_window_128"}
    for small, big in ((16384, 65536), (1024, 4096)):
        if small in windows and big in windows:
            a = windows[small]["backends"].get("blocksparse", {}).get("forward_backward_peak_bytes")
            b = windows[big]["backends"].get("blocksparse", {}).get("forward_backward_peak_bytes")
            if a and b:
                out.append({"family": "sliding_window_128", "size": f"peak {big} / peak {small}",
                            "memory_growth": b / a})
    return out


def _paired(a: dict, what_a: str, b: dict, what_b: str) -> float | None:
    """``a``'s time over ``b``'s: the median of the ratios within each round where both were timed
    in the same rounds (the machine drifts between rounds), else the ratio of the best times."""
    sa, sb = a.get(what_a + "_samples"), b.get(what_b + "_samples")
    if sa and sb and len(sa) == len(sb):
        return statistics.median(x / y for x, y in zip(sa, sb))
    ta, tb = a.get(what_a + "_s"), b.get(what_b + "_s")
    return ta / tb if ta and tb else None


def _fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def markdown(items: list[dict], machine: str) -> str:
    lines = [f"Measured on {machine}.", "",
             "| pattern | size | runs on | pairs | fwd s | fwd+bwd s | fwd+bwd peak MiB | fwd / flex fwd (<= 1) "
             "| fwd / (pairs x dense fwd) (<= 2) | fwd+bwd / fwd (<= 3.5) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i in items:
        if "memory_growth" in i:
            continue
        lines.append(f"| {i['family']} | {i['size']} | {i['runs_on']} | {i['density']:.2%} | {_fmt(i['forward_s'], '.3f')} | "
                     f"{_fmt(i['forward_backward_s'], '.3f')} | {i['peak_mib']:.0f} | {_fmt(i['vs_flex'])} | "
                     f"{_fmt(i['vs_density_x_dense'])} | {_fmt(i['train_over_forward'])} |")
    for i in items:
        if "memory_growth" in i:
            lines.append(f"\nSliding window fwd+bwd {i['size']}: {i['memory_growth']:.2f} (target <= 4.5)")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    families = sorted({r["family"] for r in rows})
    for family in families:
        fam = sorted((r for r in rows if r["family"] == family), key=lambda r: r["tokens"])
        n = [r["tokens"] for r in fam]
        for backend, style in (("blocksparse", "-o"), ("flex", "--s"), ("sdpa", ":^")):
            t = [r["backends"].get(backend, {}).get("forward_s") for r in fam]
            if any(t):
                ax_t.plot([x for x, y in zip(n, t) if y], [y for y in t if y], style, label=f"{family} {backend} fwd")
        m = [r["backends"].get("blocksparse", {}).get("forward_backward_peak_bytes") for r in fam]
        if any(m):
            ax_m.plot([x for x, y in zip(n, m) if y], [y / 2**20 for y in m if y], "-o", label=family)
        ax_t.plot(n, [r["dense_sdpa_forward_s"] for r in fam], "k:", alpha=0.3)
    for ax, label in ((ax_t, "forward time (s)"), (ax_m, "blocksparse fwd+bwd peak (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=6)
    ax_m.legend(fontsize=7)
    ax_t.set_title("forward time (dotted grey: dense SDPA, all pairs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/sparse_patterns")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", default="", help="comma-separated family prefixes to keep")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (there FlexAttention trains too)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-limit", type=int, default=16384,
                        help="largest N at which SDPA gets a dense mask")
    parser.add_argument("--flex-limit", type=int, default=16384,
                        help="largest N at which FlexAttention runs (a run at 65536 was killed for memory)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    selected = [c for c in cases(args.quick)
                if not args.only or any(c.family.startswith(p) for p in args.only.split(","))]
    cuda = torch.device(args.device).type == "cuda"
    train = [b for b in ("blocksparse", "flex" if cuda else "") if b in BACKENDS]
    forward = [b for b in ("blocksparse", "flex", "natten", "sdpa") if b in BACKENDS]
    where = torch.cuda.get_device_name(args.device) if cuda else f"{torch.get_num_threads()} threads"
    machine = f"{torch.__version__}, {where}, B=1 H={args.heads} D={args.head_dim} fp32"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(rows):  # after every case, so a run cut short keeps what it measured
        items = ratios(rows)
        (out / "sparse_patterns.json").write_text(json.dumps({"machine": machine, "rows": rows, "ratios": items},
                                                             indent=2))
        (out / "sparse_patterns.md").write_text(markdown(items, machine))
        return items

    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("sparse patterns", total=len(selected))
        for case in selected:
            progress.update(task, description=f"{case.family} {case.size}")
            rows.append(measure_case(case, args.heads, args.head_dim, args.repeats, args.dense_limit,
                                     args.flex_limit, train, forward, args.device))
            write(rows)
            progress.advance(task)
    items = write(rows)
    plot(rows, out / "sparse_patterns.png")
    table = Table(title=f"blocksparse vs peers ({machine})")
    for col in ("pattern", "size", "runs on", "pairs", "fwd s", "fwd+bwd s", "peak MiB", "vs flex", "vs pairs x dense", "train/fwd"):
        table.add_column(col)
    for i in items:
        if "memory_growth" not in i:
            table.add_row(i["family"], i["size"], i["runs_on"], f"{i['density']:.2%}", _fmt(i["forward_s"], ".3f"),
                          _fmt(i["forward_backward_s"], ".3f"), f"{i['peak_mib']:.0f}", _fmt(i["vs_flex"]),
                          _fmt(i["vs_density_x_dense"]), _fmt(i["train_over_forward"]))
    console.print(table)
    for i in items:
        if "memory_growth" in i:
            console.print(f"sliding window fwd+bwd memory {i['size']}: {i['memory_growth']:.2f}")
    console.print(f"written to {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
