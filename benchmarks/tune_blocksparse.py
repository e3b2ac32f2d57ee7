"""Tune and measure the block-sparse backend against dense SDPA on CPU.

    PYTHONPATH=src python benchmarks/tune_blocksparse.py tune --n 16384
    PYTHONPATH=src python benchmarks/tune_blocksparse.py tune --native --q-block 32 64 128 --kv-block 16 32
    PYTHONPATH=src python benchmarks/tune_blocksparse.py compare --n 4096 16384 65536

``tune`` times forward and forward+backward of a grid of (q_block, kv_block, group_rows,
window_slack) of the PyTorch tiles side by side in one process (interleaved repeats, best of them,
since the machine is shared); with ``--native``, the native kernel's (q_block, kv_block) tiles. ``compare`` times blocksparse and dense SDPA (dense boolean mask, as the ``sdpa`` backend
runs it) forward and forward+backward, and measures the peak resident memory (VmHWM) of one
forward+backward in a fresh subprocess per case. Setting: fp32, B=1, H=8, D=64,
SlidingWindow(128, 128), 2 threads.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from multihead.backends.blocksparse import BlockSparseBackend
from multihead.patterns import SlidingWindow
from multihead.request import make_request

B, H, D = 1, 8, 64
PATTERN = SlidingWindow(128, 128)


def inputs(n: int, grad: bool):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, n, D, generator=gen).requires_grad_(grad) for _ in range(3)]


def blocksparse_fn(backend: BlockSparseBackend, n: int, grad: bool):
    q, k, v = inputs(n, grad)
    dout = torch.ones(B, H, n, D)

    def run():
        if not grad:
            with torch.no_grad():
                return backend.forward(make_request(q, k, v, pattern=PATTERN))[0]
        for t in (q, k, v):
            t.grad = None
        out = backend.forward(make_request(q, k, v, pattern=PATTERN))[0]
        out.backward(dout)
        return out
    run.leaves = (q, k, v)
    return run


def sdpa_fn(n: int, grad: bool):
    q, k, v = inputs(n, grad)
    dout = torch.ones(B, H, n, D)
    mask = PATTERN.dense_mask(n, n)

    def run():
        if not grad:
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        for t in (q, k, v):
            t.grad = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.backward(dout)
        return out
    run.leaves = (q, k, v)
    return run


def best_times(fns: dict, repeats: int, medians: dict | None = None) -> dict:
    """Interleaved repeats (one warm-up each); the best time of every function (medians go into
    ``medians`` when given)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    if medians is not None:
        medians.update({name: sorted(ts)[len(ts) // 2] for name, ts in times.items()})
    return {name: min(ts) for name, ts in times.items()}


def peak_rss(case: str, n: int, kwargs: dict) -> dict:
    """VmHWM of one forward+backward (after a warm-up run) in this process, in MiB."""
    torch.set_num_threads(2)
    fn = sdpa_fn(n, True) if case == "sdpa" else blocksparse_fn(BlockSparseBackend(**kwargs), n, True)
    fn()  # warm-up: builds and caches the plan
    for t in fn.leaves:  # the baseline holds q, k, v and dout, not the warm-up's gradients
        t.grad = None
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return {"peak_mib": _status("VmHWM") / 1024, "before_mib": base / 1024}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_memory(case: str, n: int, kwargs: dict) -> dict:
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); from tune_blocksparse import peak_rss; "
            f"print(json.dumps(peak_rss({case!r}, {n}, {kwargs!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tune(args):
    configs = []
    if args.native:  # one tile per query block: group_rows does not apply
        configs = [dict(q_block=qb, kv_block=kb) for qb, kb in itertools.product(args.q_block, args.kv_block)]
    for qb, kb, gr, ws in itertools.product(args.q_block, args.kv_block, args.group_rows, args.slack):
        if gr >= qb and not args.native:
            configs.append(dict(q_block=qb, kv_block=kb, group_rows=gr, window_slack=ws, native=False))
    fwd = {json.dumps(c): blocksparse_fn(BlockSparseBackend(**c), args.n[0], False) for c in configs}
    both = {json.dumps(c): blocksparse_fn(BlockSparseBackend(**c), args.n[0], True) for c in configs}
    tf = best_times(fwd, args.repeats)
    tb = best_times(both, args.repeats)
    print(f"N={args.n[0]}: forward, forward+backward (s), ratio; best of {args.repeats}")
    for name in sorted(tf, key=tf.get):
        print(f"  {tf[name]:.4f}  {tb[name]:.4f}  {tb[name] / tf[name]:.2f}  {name}")


def compare(args):
    kwargs = json.loads(args.config)
    rows = []
    for n in args.n:
        density = PATTERN.density(n, n)
        fns = {"bs_fwd": blocksparse_fn(BlockSparseBackend(**kwargs), n, False),
               "bs_fwdbwd": blocksparse_fn(BlockSparseBackend(**kwargs), n, True)}
        dense = n <= args.max_dense
        if dense:
            fns["sdpa_fwd"] = sdpa_fn(n, False)
            fns["sdpa_fwdbwd"] = sdpa_fn(n, True)
        med = {}
        t = best_times(fns, args.repeats if n < 32768 else max(2, args.repeats // 2), med)
        row = {"n": n, "density": round(density, 5), **{k: round(v, 4) for k, v in t.items()},
               "median": {k: round(v, 4) for k, v in med.items()}}
        row["bs_mem"] = measure_memory("bs", n, kwargs)
        if dense:
            row["sdpa_mem"] = measure_memory("sdpa", n, {})
            row["fwd_target"] = round(2 * density * t["sdpa_fwd"], 4)
            row["fwd_vs_target"] = round(t["bs_fwd"] / row["fwd_target"], 3)
            row["speedup_fwd"] = round(t["sdpa_fwd"] / t["bs_fwd"], 1)
            row["speedup_fwdbwd"] = round(t["sdpa_fwdbwd"] / t["bs_fwdbwd"], 1)
        row["bwd_ratio"] = round(t["bs_fwdbwd"] / t["bs_fwd"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) > 1:
        for a, b in zip(rows, rows[1:]):
            ma, mb = a["bs_mem"], b["bs_mem"]
            extra = (mb["peak_mib"] - mb["before_mib"]) / max(ma["peak_mib"] - ma["before_mib"], 1e-9)
            print(f"blocksparse peak RSS {b['n']}/{a['n']}: {mb['peak_mib'] / ma['peak_mib']:.2f}x "
                  f"(above the pre-run RSS: {extra:.2f}x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["tune", "compare"])
    parser.add_argument("--n", type=int, nargs="+", default=[16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--q-block", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--kv-block", type=int, nargs="+", default=[32])
    parser.add_argument("--group-rows", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--slack", type=float, nargs="+", default=[0.25, -1.0])
    parser.add_argument("--config", default="{}", help="BlockSparseBackend kwargs (JSON) for compare")
    parser.add_argument("--max-dense", type=int, default=16384, help="largest N to run dense SDPA at")
    parser.add_argument("--native", action="store_true", help="tune the native kernel's tiles")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune(args) if args.mode == "tune" else compare(args)


if __name__ == "__main__":
    main()
