"""Sparse and local patterns: time and peak memory per backend, against N or grid size.

The block-sparse backend is measured on its native kernel ("blocksparse") and, in the same rounds,
on its PyTorch tiles ("torch_tiles": the path before the kernel), with its bfloat16 forward, its
computed pairs (the kernel's tile table) against the pairs the pattern needs, and for top-k the
key-list attention alone against the same number of pairs run densely, against a gather of the
same rows (torch's ``embedding_bag`` summing each query's own key and value rows: the lists'
memory traffic with no products or softmax, a yardstick rather than a bound) and against the same
lists with every row in L1 (their compute alone). Beside the kernel's fwd+bwd / fwd, the same ratio
of PyTorch's fused dense attention (``--peer-tokens``). How close each pass comes to the machine's
limit: the kernel's forward and backward and dense SDPA as fractions of the rate of a float32
matrix product (``torch.mm``, 1024 cubed) timed in the same rounds, counting the multiply-adds of
the computed pairs (forward: Q K^T and P V; backward: five products); and the kernel's two passes
(best times) as fractions of the cores' limit, the kernel build's vector multiply-adds running on
registers alone (``multiply_add_rate``, measured once before the cases).

Writes ``sparse_patterns.json``, ``sparse_patterns.png`` and ``sparse_patterns.md`` (the table of
ratios that ``docs/performance.md`` quotes) into ``--out``. Every ratio compares figures measured
side by side in this one run (as the median of the ratios within each round, where both were
timed in the same rounds). The table's row is the kernel's, or for a pattern that differs per
head the ``heads`` split's that ``backend="auto"`` runs ("auto runs"); where the ``documents``
backend serves a case (packed documents, routing's clusters: one SDPA call per document or
cluster), it is timed too and the kernel's ratio to it reported. Times are the best of
``--repeats`` rounds in which every backend runs once (within a budget per case), so that a
machine whose speed drifts slows all of them alike. A few cases carry a score, timed with it on
every backend (``routing_16_alibi``; ``--only scored``: the window with ALiBi, Swin with its
learned 2-D table, whose rows compare with the same patterns' unscored ones).

    python benchmarks/sparse_patterns.py --out results/sparse            # the full set (~25 min)
    python benchmarks/sparse_patterns.py --quick --out results/sparse    # small sizes (~1 min)
    python benchmarks/sparse_patterns.py --device cuda --out results/sparse_cuda  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import multihead as mh
from multihead.backends import BACKENDS
from multihead.backends.blocksparse import BlockSparseBackend
from multihead.backends.head_groups import head_split
from multihead.bench.measure import peak_memory, time_call, time_interleaved
from multihead.backends.native import describe as native_status
from multihead.backends.native import kernel as native_kernel
from multihead.patterns import (Axial, Causal, CrossShapedWindow, Documents, Full, KeySelection, Neighborhood,
                                Pattern, Routing, ShiftedWindow, SlidingWindow, TopK)
from multihead.request import make_request
from multihead.scores import ALiBi, RelativePositionBias2d, Score


KERNEL = BACKENDS["blocksparse"]
TORCH_TILES = BlockSparseBackend(native=False)


@dataclass(frozen=True)
class Case:
    family: str
    size: str
    tokens: int
    pattern: Pattern
    #: the score of the case for a number of heads (None: none)
    score: Callable[[int], Score] | None = None


def cases(quick: bool) -> list[Case]:
    lengths = (1024, 4096) if quick else (4096, 16384, 65536)
    grids = ((32, 32),) if quick else ((64, 64), (128, 128))
    out = [Case("sliding_window_128", str(n), n, SlidingWindow(128, 128)) for n in lengths]
    for kernel in (7, 13):
        out += [Case(f"neighborhood_{kernel}x{kernel}", f"{g[0]}x{g[1]}", g[0] * g[1],
                     Neighborhood(kernel, grid=g)) for g in grids]
    out += [Case("swin_8x8_shift4", f"{g[0]}x{g[1]}", g[0] * g[1], ShiftedWindow(8, 4, grid=g)) for g in grids]
    out += [Case("axial_rows", f"{g[0]}x{g[1]}", g[0] * g[1], Axial(g, axis=1)) for g in grids]
    out += [Case("cswin_stripe_8", f"{g[0]}x{g[1]}", g[0] * g[1], CrossShapedWindow(8, g, heads=8)) for g in grids]
    for n in lengths[:2]:  # 16 packed documents of uneven lengths, causal inside each
        cuts = torch.linspace(0, 1, 17) ** 1.5 * n
        out.append(Case("documents_16_causal", str(n), n, Documents(cuts.round().long()) & Causal()))
    dynamic = (1024, 4096) if quick else (4096, 16384)
    out += [Case("topk_64", str(n), n, TopK(64)) for n in dynamic]
    out += [Case("topk_16_in_window_128", str(n), n, TopK(16) & SlidingWindow(128, 128)) for n in dynamic]
    out += [Case("routing_16", str(n), n, Routing(16)) for n in dynamic]
    # ALiBi read at the tokens' original positions (the tiles run on tokens sorted by cluster)
    out += [Case("routing_16_alibi", str(n), n, Routing(16), ALiBi) for n in dynamic]
    if not quick:  # scores inside the tiles: ALiBi on the window, Swin's learned 2-D table
        out += [Case("scored_window_128_alibi", str(n), n, SlidingWindow(128, 128), ALiBi) for n in lengths[:2]]
        out += [Case("scored_swin_8x8_shift4_table", f"{g[0]}x{g[1]}", g[0] * g[1], ShiftedWindow(8, 4, grid=g),
                     lambda heads, g=g: RelativePositionBias2d(heads, 8, grid=g)) for g in grids]
    return out


def _inputs(n: int, heads: int, head_dim: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, head_dim, generator=gen).to(device) for _ in range(4)]


def _able(backend: str, q, k, v, pattern, score=None) -> bool:
    return backend in BACKENDS and BACKENDS[backend].unsupported(make_request(q, k, v, pattern=pattern,
                                                                              score=score)) is None


def measure_case(case: Case, heads: int, head_dim: int, repeats: int, dense_limit: int, flex_limit: int,
                 train_backends: list[str], forward_backends: list[str], device: str = "cpu") -> dict:
    q, k, v, grad = _inputs(case.tokens, heads, head_dim, device)
    score = case.score(heads) if case.score else None
    resolved = make_request(q, k, v, pattern=case.pattern).pattern  # dynamic patterns: this input's
    auto = mh.explain(q, k, v, pattern=case.pattern, score=score, show=False).backend  # what runs by default
    row: dict = {"family": case.family, "size": case.size, "tokens": case.tokens, "auto": auto,
                 "heads": heads, "head_dim": head_dim, "batch": q.shape[0], "dynamic": case.pattern.dynamic,
                 "density": resolved.density(case.tokens, case.tokens), "backends": {}}
    if auto == "heads":  # block-sparse on the whole per-head pattern gathers per head: its plans
        # (hundreds of MiB of masks) would evict the halves' plans from the same bounded cache
        train_backends = [b for b in train_backends if b != "blocksparse"]
        forward_backends = [b for b in forward_backends if b != "blocksparse"]
    # what auto runs, and the documents backend wherever it serves the case (one SDPA call per
    # document or cluster: the alternative auto weighs the kernel against)
    extra = [auto] + ["documents"] * _able("documents", q, k, v, case.pattern, score)
    train_backends = train_backends + [b for b in extra if b not in train_backends]
    forward_backends = forward_backends + [b for b in extra if b not in forward_backends]

    def forward(backend, pattern, inputs=(q, k, v), score=score):
        def run():
            with torch.no_grad():
                mh.attention(*inputs, pattern=pattern, score=score, backend=backend)
        return run

    def torch_tiles(fn):
        """``fn`` with the block-sparse backend on its PyTorch tiles (the path before the kernel): a
        backend instance of its own, so the two paths' plans do not evict each other's."""
        def run():
            BACKENDS["blocksparse"] = TORCH_TILES
            try:
                return fn()
            finally:
                BACKENDS["blocksparse"] = KERNEL
        return run

    row["computed_pairs"] = computed_pairs(make_request(q, k, v, pattern=resolved))

    # Every backend's forward and our forward+backward, timed in rounds (each once per round), so
    # that the machine's drift slows them alike and their ratios stay fair; with them dense SDPA on
    # the full (unmasked) problem, the yardstick for "fraction of pairs x dense" (on its own past
    # dense_limit, where one call takes a minute).
    dense = forward("sdpa", Full(), score=None)
    timed = {("dense", "sdpa"): dense} if case.tokens <= dense_limit else {}
    if device == "cpu":  # the yardstick of the rates: a float32 matrix product on this machine
        a, b = (torch.randn(GEMM_SIZE, GEMM_SIZE) for _ in range(2))
        timed[("gemm", "mm")] = lambda: torch.mm(a, b)
    if case.tokens > dense_limit:
        row["dense_sdpa_forward_s"] = time_call(dense, repeats=repeats, warmup=1, budget_s=30).low
    for backend in forward_backends:
        if backend == "sdpa" and case.tokens > dense_limit:
            continue  # a dense N x N mask would not fit
        if backend == "flex" and case.tokens > flex_limit:
            continue
        if backend == "natten" and case.tokens > 4096:
            continue  # on CPU NATTEN runs uncompiled FlexAttention, which materialises N x N logits
        if _able(backend, q, k, v, case.pattern, score):
            timed[("forward_s", backend)] = forward(backend, case.pattern)
    if device == "cpu":
        timed[("forward_s", "torch_tiles")] = torch_tiles(forward(kernel_of(auto), case.pattern))
        if auto not in ("blocksparse", "heads"):
            timed[("forward_s", "auto_torch_tiles")] = torch_tiles(forward(auto, case.pattern))
        low = tuple(t.bfloat16() for t in (q, k, v))
        timed[("bf16_forward_s", kernel_of(auto))] = forward(kernel_of(auto), case.pattern, low)
    if isinstance(case.pattern, TopK):  # the key-list attention alone, and the same pairs dense
        kept = case.pattern.k
        timed[("lists_forward_s", "blocksparse")] = forward("blocksparse", resolved)
        timed[("lists_forward_s", "dense_same_pairs")] = forward(
            "sdpa", Full(), (q, k[:, :, :kept].contiguous(), v[:, :, :kept].contiguous()))
        timed[("lists_forward_s", "embedding_bag_gather")] = embedding_bag_gather(resolved.indices, k, v)
        timed[("lists_forward_s", "lists_in_l1")] = forward("blocksparse", lists_in_l1(resolved))
        timed[("choice_s", "topk")] = lambda: make_request(q, k, v, pattern=case.pattern)
    trainers = {}
    for backend in train_backends:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if not _able(backend, *leaves, case.pattern, score):
            continue

        def train(backend=backend, leaves=leaves):
            for t in leaves:
                t.grad = None
            mh.attention(*leaves, pattern=case.pattern, score=score, backend=backend).backward(grad)

        trainers[backend] = timed[("forward_backward_s", backend)] = train
        if backend == kernel_of(auto) and device == "cpu":
            # leaves of its own: a step frees its leaves' last gradients (``grad = None``), and
            # freeing the other path's (unmapping 3 x 32 MiB at 16k tokens) would land in its time
            own = [t.clone().requires_grad_() for t in (q, k, v)]
            trainers["torch_tiles"] = timed[("forward_backward_s", "torch_tiles")] = torch_tiles(
                lambda train=train, own=own: train(leaves=own))
    timings = time_interleaved(timed, repeats=repeats, warmup=1, budget_s=60)
    for (what, backend), timing in timings.items():
        if what == "dense":
            row["dense_sdpa_forward_s"] = timing.low
            row["dense_sdpa_samples"] = list(timing.samples)
        elif what == "gemm":
            row["gemm_s"], row["gemm_samples"] = timing.low, list(timing.samples)
        else:
            entry = row["backends"].setdefault(backend, {})
            entry[what] = timing.low
            entry[what.replace("_s", "_samples")] = list(timing.samples)
    for backend, train in trainers.items():
        entry = row["backends"][backend]
        entry["forward_backward_peak_bytes"] = peak_memory(train, device)
        run = torch_tiles(forward(kernel_of(auto), case.pattern)) if backend == "torch_tiles" \
            else forward(backend, case.pattern)
        entry["forward_peak_bytes"] = peak_memory(run, device)
    return row


def list_rows(indices, kv_heads: int, kv_len: int):
    """Key lists ``indices`` (B, H, Lq, n) as rows of keys flattened to (B * kv_heads * kv_len, D):
    one list of n rows per query (query head h reads key head h // (H / kv_heads))."""
    batch, heads, _, n = indices.shape
    head = torch.arange(heads, device=indices.device).view(1, heads, 1, 1) // (heads // kv_heads)
    start = (torch.arange(batch, device=indices.device).view(batch, 1, 1, 1) * kv_heads + head) * kv_len
    return (indices + start).reshape(-1, n)


def lists_in_l1(lists: KeySelection) -> KeySelection:
    """Key lists of the same shape in which every query names the first keys: the same work with
    its rows in L1, what the key-list kernel costs without waiting on memory."""
    batch, heads, q_len, n = lists.indices.shape
    first = torch.arange(n, device=lists.indices.device).expand(batch, heads, q_len, n).contiguous()
    return KeySelection(first, torch.ones_like(first, dtype=torch.bool), lists.kv_len)


def embedding_bag_gather(indices, k, v):
    """A call that reads the rows of ``k`` and ``v`` that key lists ``indices`` (B, H, Lq, n)
    name, each query's own, and sums them per query (``embedding_bag``): the memory traffic of
    key-list attention with no products or softmax (a yardstick: a kernel can read faster)."""
    rows = list_rows(indices, k.shape[1], k.shape[2])
    keys, values = k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])

    def run():
        with torch.no_grad():
            torch.nn.functional.embedding_bag(rows, keys, mode="sum")
            torch.nn.functional.embedding_bag(rows, values, mode="sum")
    return run


def peer_training(tokens: int, heads: int, head_dim: int, repeats: int, device: str = "cpu") -> dict:
    """PyTorch's own fused attention (dense SDPA on ``tokens`` tokens, no mask) timed forward and
    forward+backward in the same rounds: its fwd+bwd / fwd (the median of the rounds' ratios) is
    the peer of the kernel's, since both recompute the weights in backward."""
    q, k, v, grad = _inputs(tokens, heads, head_dim, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def forward():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def train():
        for t in leaves:
            t.grad = None
        torch.nn.functional.scaled_dot_product_attention(*leaves).backward(grad)

    timings = time_interleaved({"forward": forward, "forward_backward": train}, repeats=repeats, warmup=1,
                               budget_s=60)
    f, fb = timings["forward"].samples, timings["forward_backward"].samples
    return {"tokens": tokens, "forward_s": min(f), "forward_backward_s": min(fb),
            "train_over_forward": statistics.median(b / a for a, b in zip(f, fb))}


def kernel_of(auto: str) -> str:
    """The backend whose figures the kernel's row reports: block-sparse, or the per-head split
    (``heads``) that runs each run of heads through it."""
    return "heads" if auto == "heads" else "blocksparse"


def computed_pairs(req) -> float:
    """The (query, key) pairs per (batch, head) that the native kernel computes for ``req`` (for a
    pattern that differs per head, as the ``heads`` split runs it: each run of heads on its own)."""
    runs = head_split(req)
    if runs is not None:
        total = 0.0
        for h0, h1, pattern in runs:
            part = make_request(req.q[:, h0:h1], req.k[:, h0:h1], req.v[:, h0:h1], pattern=pattern)
            total += (h1 - h0) / req.heads * computed_pairs(part)
        return total
    return BACKENDS["blocksparse"].native_table(req).pairs


GEMM_SIZE = 1024  # the matrix product whose rate the passes are measured against
FORWARD_PRODUCTS, BACKWARD_PRODUCTS = 2, 5  # Q K^T and P V; the backward's recomputed Q K^T, dO V^T, dV, dQ, dK


def product_macs(r: dict, pairs: float) -> float:
    """The multiply-adds of one product (``q . k`` or its like) over ``pairs`` (query, key) pairs."""
    return r["batch"] * r["heads"] * r["head_dim"] * pairs


def rates(r: dict, ours: dict) -> dict:
    """The forward's and backward's (fwd+bwd minus fwd, per round, where positive) float32 rate over that of
    ``torch.mm`` in the same rounds, and dense SDPA's: multiply-adds of the computed pairs (2 products
    forward, 5 backward; dense SDPA 2 on all pairs) over GEMM_SIZE cubed per GEMM time, the median
    over rounds (dense SDPA timed on its own, past ``--dense-limit``: from the best times). None where
    a time is missing, and for dynamic patterns (their forward includes the choice of keys)."""
    gemm = r.get("gemm_samples")
    if not gemm or not r.get("computed_pairs") or r.get("dynamic"):
        return {"forward_vs_gemm": None, "backward_vs_gemm": None, "dense_vs_gemm": None}
    per_product = product_macs(r, r["computed_pairs"]) / GEMM_SIZE ** 3  # in GEMMs

    def fraction(macs: float, samples, best: float | None = None) -> float | None:
        if not samples or len(samples) != len(gemm):  # timed on its own: the best times
            return macs * r["gemm_s"] / best if best else None
        kept = [macs * g / t for t, g in zip(samples, gemm) if t > 0]  # a noisy round can leave bwd <= 0
        return statistics.median(kept) if kept else None

    f, fb = ours.get("forward_samples"), ours.get("forward_backward_samples")
    b = [y - x for x, y in zip(f, fb)] if f and fb and len(f) == len(fb) else None
    n = r["tokens"]
    return {"forward_vs_gemm": fraction(FORWARD_PRODUCTS * per_product, f),
            "backward_vs_gemm": fraction(BACKWARD_PRODUCTS * per_product, b),
            "dense_vs_gemm": fraction(FORWARD_PRODUCTS * product_macs(r, n * n) / GEMM_SIZE ** 3,
                                      r.get("dense_sdpa_samples"), r.get("dense_sdpa_forward_s"))}


def multiply_add_limit(repeats: int, steps: int = 20_000_000) -> float | None:
    """The cores' limit for the kernel's products, in GFLOP/s over the threads: the best of
    ``repeats`` runs of the kernel build's vector multiply-adds on registers (``multiply_add_rate``);
    None without the kernel."""
    module = native_kernel()
    if module is None:
        return None
    return max(module.multiply_add_rate(steps) for _ in range(max(repeats, 1)))


def against_limit(r: dict, ours: dict, limit: float | None) -> dict:
    """The kernel's forward and backward (fwd+bwd minus fwd) float32 rates from their best times, as
    fractions of the cores' limit (``multiply_add_limit``, GFLOP/s): 2 flops per multiply-add of
    the computed pairs, 2 products forward and 5 backward. None without the limit, for dynamic
    patterns, and for a backward no slower than the forward."""
    none = {"forward_vs_limit": None, "backward_vs_limit": None}
    if not limit or not r.get("computed_pairs") or r.get("dynamic"):
        return none
    flops = 2 * product_macs(r, r["computed_pairs"]) / 1e9  # one product's, in GFLOP
    f, fb = ours.get("forward_s"), ours.get("forward_backward_s")
    return {"forward_vs_limit": FORWARD_PRODUCTS * flops / f / limit if f else None,
            "backward_vs_limit": BACKWARD_PRODUCTS * flops / (fb - f) / limit if f and fb and fb > f else None}


def ratios(rows: list[dict], limit: float | None = None) -> list[dict]:
    """The issue's targets as ratios within this run, for the block-sparse kernel (for a pattern
    that differs per head: the ``heads`` split that runs it); ``limit``: the cores' multiply-add
    rate (``multiply_add_limit``), where measured."""
    out = []
    for r in rows:
        per_head = kernel_of(r.get("auto", "blocksparse")) == "heads"
        ours = r["backends"].get("heads" if per_head else "blocksparse", {})
        old = r["backends"].get("torch_tiles", {})
        flex = r["backends"].get("flex", {})
        auto = r["backends"].get(r.get("auto", "blocksparse"), {})
        n = r["tokens"]
        computed = r["computed_pairs"] / (n * n) if r.get("computed_pairs") else None
        item = {"family": r["family"], "size": r["size"], "runs_on": r.get("auto", "blocksparse"),
                "density": r["density"], "computed": computed, "forward_s": ours.get("forward_s"),
                "forward_backward_s": ours.get("forward_backward_s"),
                "old_forward_s": old.get("forward_s"), "auto_forward_s": auto.get("forward_s"),
                "peak_mib": (ours.get("forward_backward_peak_bytes") or 0) / 2**20}
        item["vs_flex"] = _paired(ours, "forward", flex, "forward")
        item["vs_old"] = _paired(ours, "forward", old, "forward")
        item["old_train_over_forward"] = _paired(old, "forward_backward", old, "forward")
        dense = {"forward_s": r["dense_sdpa_forward_s"], "forward_samples": r.get("dense_sdpa_samples")}
        vs_dense = _paired(ours, "forward", dense, "forward")
        item["vs_computed_x_dense"] = vs_dense / computed if vs_dense and computed else None
        item["vs_density_x_dense"] = vs_dense / r["density"] if vs_dense else None
        item["computed_over_needed"] = computed / r["density"] if computed else None
        item["train_over_forward"] = _paired(ours, "forward_backward", ours, "forward")
        item["fp32_over_bf16"] = _paired(ours, "forward", ours, "bf16_forward")
        item.update(rates(r, ours))
        item.update(against_limit(r, ours, limit))
        item["gemm_gflops"] = 2 * GEMM_SIZE ** 3 / r["gemm_s"] / 1e9 if r.get("gemm_s") else None
        if r.get("auto", "blocksparse") not in ("blocksparse", "heads"):
            item["auto_vs_old"] = _paired(auto, "forward", r["backends"].get("auto_torch_tiles", {}), "forward")
        split = r["backends"].get("documents", {})
        if split and ours:
            item["vs_documents"] = _paired(ours, "forward", split, "forward")
            item["train_vs_documents"] = _paired(ours, "forward_backward", split, "forward_backward")
        lists, same = ours.get("lists_forward_s"), r["backends"].get("dense_same_pairs", {})
        if lists:
            item["lists_vs_dense_same_pairs"] = _paired(ours, "lists_forward", same, "lists_forward")
            gather = r["backends"].get("embedding_bag_gather", {})
            item["lists_vs_gather"] = _paired(ours, "lists_forward", gather, "lists_forward")
            item["gather_vs_dense_same_pairs"] = _paired(gather, "lists_forward", same, "lists_forward")
            in_l1 = r["backends"].get("lists_in_l1", {})
            item["lists_in_l1_vs_dense_same_pairs"] = _paired(in_l1, "lists_forward", same, "lists_forward")
            choice = r["backends"].get("topk", {})
            item["choice_vs_dense"] = _paired(choice, "choice", dense, "forward")
        out.append(item)
    windows = {r["tokens"]: r for r in rows if r["family"] == "sliding_window_128"}
    for small, big in ((16384, 65536), (1024, 4096)):
        if small in windows and big in windows:
            for backend in ("blocksparse", "torch_tiles"):
                a = windows[small]["backends"].get(backend, {}).get("forward_backward_peak_bytes")
                b = windows[big]["backends"].get(backend, {}).get("forward_backward_peak_bytes")
                if a and b:
                    out.append({"family": "sliding_window_128", "backend": backend,
                                "size": f"peak {big} / peak {small}", "memory_growth": b / a})
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


COLUMNS = [  # (header, key, format) of the table; targets of the native-kernel issue in brackets
    ("pattern", "family", "s"), ("size", "size", "s"), ("auto runs", "runs_on", "s"),
    ("needed", "density", ".2%"), ("computed / needed (<= 2)", "computed_over_needed", ".2f"),
    ("fwd s", "forward_s", ".3f"), ("fwd+bwd s", "forward_backward_s", ".3f"),
    ("old fwd s", "old_forward_s", ".3f"), ("fwd / old (<= 0.7)", "vs_old", ".2f"),
    ("fwd / flex (<= 0.5)", "vs_flex", ".2f"),
    ("fwd / (computed x dense) (<= 1.3)", "vs_computed_x_dense", ".2f"),
    ("fwd / (needed x dense)", "vs_density_x_dense", ".2f"),
    ("fwd+bwd / fwd (<= 3)", "train_over_forward", ".2f"), ("fp32 / bf16 fwd (>= 1.5)", "fp32_over_bf16", ".2f"),
    ("peak MiB", "peak_mib", ".0f"), ("fwd rate / GEMM", "forward_vs_gemm", ".0%"),
    ("bwd rate / GEMM", "backward_vs_gemm", ".0%"), ("dense SDPA rate / GEMM", "dense_vs_gemm", ".0%"),
    ("fwd rate / limit", "forward_vs_limit", ".0%"), ("bwd rate / limit", "backward_vs_limit", ".0%"),
]


def markdown(items: list[dict], machine: str, peer: dict | None = None, limit: float | None = None) -> str:
    """The table and the notes below it; ``peer``: ``peer_training``'s figures, ``limit`` the cores'
    multiply-add rate (GFLOP/s), where measured."""
    lines = [f"Measured on {machine}.", "",
             "| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for i in items:
        if "memory_growth" in i:
            continue
        lines.append("| " + " | ".join(_fmt(i.get(key), spec) if spec != "s" else str(i[key])
                                       for _, key, spec in COLUMNS) + " |")
    lines.append("")
    gemm = [i["gemm_gflops"] for i in items if i.get("gemm_gflops")]
    if gemm:
        lines.append(f"- float32 GEMM (torch.mm, {GEMM_SIZE} cubed) in these rounds, the rates' yardstick: "
                     f"{min(gemm):.0f}-{max(gemm):.0f} GFLOP/s")
    if limit:
        beside = f"; the GEMM runs at {min(gemm) / limit:.0%}-{max(gemm) / limit:.0%} of it" if gemm else ""
        lines.append(f"- the cores' limit, the kernel build's vector multiply-adds on registers alone: "
                     f"{limit:.0f} GFLOP/s{beside}")
    if peer:
        lines.append(f"- PyTorch's fused attention (dense SDPA, {peer['tokens']} tokens, no mask) fwd+bwd / fwd: "
                     f"{peer['train_over_forward']:.2f}, the peer of the column fwd+bwd / fwd (forward "
                     f"{peer['forward_s']:.4f} s, fwd+bwd {peer['forward_backward_s']:.4f} s)")
    for i in items:
        if "memory_growth" in i:
            lines.append(f"- Sliding window fwd+bwd {i['size']} ({i['backend']}): {i['memory_growth']:.2f} (target <= 4.3)")
        if i.get("auto_vs_old") is not None:
            lines.append(f"- {i['family']} {i['size']}: auto ({i['runs_on']}) forward {_fmt(i['auto_forward_s'], '.3f')} s, "
                         f"{_fmt(i['auto_vs_old'])} x the same with PyTorch tiles")
        if i.get("vs_documents") is not None:
            lines.append(f"- {i['family']} {i['size']}: kernel / the documents backend (one SDPA call per document "
                         f"or cluster): forward {_fmt(i['vs_documents'])}, forward+backward "
                         f"{_fmt(i.get('train_vs_documents'))}")
        if i.get("lists_vs_dense_same_pairs") is not None:
            lines.append(f"- {i['family']} {i['size']}: key-list attention / the same pairs dense (<= 1.5): "
                         f"{_fmt(i['lists_vs_dense_same_pairs'])}; / embedding_bag summing the same rows: "
                         f"{_fmt(i.get('lists_vs_gather'))}, that gather itself / the same pairs dense: "
                         f"{_fmt(i.get('gather_vs_dense_same_pairs'))}, the lists with every row in L1 / the same "
                         f"pairs dense: {_fmt(i.get('lists_in_l1_vs_dense_same_pairs'))}; the choice / dense SDPA "
                         f"forward: {_fmt(i['choice_vs_dense'])}")
        if i.get("old_train_over_forward") is not None and i["family"].startswith("sliding"):
            lines.append(f"- {i['family']} {i['size']}: PyTorch tiles fwd+bwd / fwd {_fmt(i['old_train_over_forward'])}")
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
    parser.add_argument("--peer-tokens", type=int, default=None,
                        help="tokens of the dense SDPA whose fwd+bwd / fwd is reported beside the kernel's "
                             "(default 2048, 512 with --quick; 0: not measured)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    selected = [c for c in cases(args.quick)
                if not args.only or any(c.family.startswith(p) for p in args.only.split(","))]
    cuda = torch.device(args.device).type == "cuda"
    train = [b for b in ("blocksparse", "flex" if cuda else "") if b in BACKENDS]
    forward = [b for b in ("blocksparse", "flex", "natten", "sdpa") if b in BACKENDS]
    where = torch.cuda.get_device_name(args.device) if cuda else f"{torch.get_num_threads()} threads"
    machine = f"{torch.__version__}, {where}, B=1 H={args.heads} D={args.head_dim} fp32; {native_status()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    peer_tokens = args.peer_tokens if args.peer_tokens is not None else (512 if args.quick else 2048)
    peer = None
    limit = None if cuda else multiply_add_limit(args.repeats)

    def write(rows):  # after every case, so a run cut short keeps what it measured
        items = ratios(rows, limit)
        (out / "sparse_patterns.json").write_text(json.dumps({"machine": machine, "peer_dense_training": peer,
                                                              "multiply_add_limit_gflops": limit,
                                                              "rows": rows, "ratios": items}, indent=2))
        (out / "sparse_patterns.md").write_text(markdown(items, machine, peer, limit))
        return items

    rows = []
    with Progress(console=console) as progress:
        if peer_tokens:
            progress.console.print(f"dense SDPA fwd and fwd+bwd at {peer_tokens} tokens (the training peer)")
            peer = peer_training(peer_tokens, args.heads, args.head_dim, args.repeats, args.device)
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
    for header, _, _ in COLUMNS:
        table.add_column(header)
    for i in items:
        if "memory_growth" not in i:
            table.add_row(*(_fmt(i.get(key), spec) if spec != "s" else str(i[key]) for _, key, spec in COLUMNS))
    console.print(table)
    console.print(markdown(items, machine, peer, limit).split("\n\n", 1)[1].split("|\n\n", 1)[-1])
    console.print(f"written to {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
