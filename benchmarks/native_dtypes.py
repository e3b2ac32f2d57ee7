"""The block-sparse backend's native kernel against its PyTorch tiles, per dtype and normaliser.

For each pattern (a 16k sliding window and a 7 x 7 neighborhood on a 128 x 128 grid, B=1, H=8,
D=64) and each of float32, bfloat16 and float16 with the softmax, and float32 with sigmoid weights
(``Sigmoid``), the forward and forward+backward time of the kernel and of the PyTorch tiles (the
same backend with ``native=False``), timed in interleaved rounds (best of ``--repeats``), and their
ratio. Writes ``native_dtypes.json`` and ``native_dtypes.md`` to ``--out``.

    python benchmarks/native_dtypes.py --out results/native_dtypes
    python benchmarks/native_dtypes.py --quick --out results/native_dtypes   # 4k tokens, 64 x 64 grid
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.progress import track

from multihead.backends import BACKENDS
from multihead.backends.blocksparse import BlockSparseBackend
from multihead.backends.native import describe as native_status
from multihead.bench.measure import time_interleaved
from multihead.patterns import Neighborhood, SlidingWindow
from multihead.request import make_request

CASES = (("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None), ("float16", torch.float16, None),
         ("float32 sigmoid", torch.float32, "sigmoid"))


def measure(pattern, tokens: int, dtype, normalizer, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, 8, tokens, 64, generator=gen).to(dtype) for _ in range(4))
    kernel, tiles = BACKENDS["blocksparse"], BlockSparseBackend(native=False)

    def forward(backend):
        def run():
            with torch.no_grad():
                backend.forward(make_request(q, k, v, pattern=pattern, normalizer=normalizer))
        return run

    def train(backend):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def run():  # a step: its leaves' last gradients dropped, not accumulated into
            for t in leaves:
                t.grad = None
            out = backend.forward(make_request(*leaves, pattern=pattern, normalizer=normalizer))[0]
            out.backward(grad)
        return run

    fns = {("kernel", "fwd"): forward(kernel), ("tiles", "fwd"): forward(tiles),
           ("kernel", "fwd+bwd"): train(kernel), ("tiles", "fwd+bwd"): train(tiles)}
    got = time_interleaved(fns, repeats=repeats, warmup=1)
    assert kernel.describe(make_request(q, k, v, pattern=pattern, normalizer=normalizer)) == "native kernel"
    return {f"{path} {kind}": min(got[(path, kind)].samples) for path, kind in fns}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/native_dtypes"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="4k tokens and a 64 x 64 grid")
    args = parser.parse_args()
    tokens, side = (4096, 64) if args.quick else (16384, 128)
    patterns = (("sliding_window_128", SlidingWindow(128, 128)), (f"neighborhood_7x7 {side}x{side}",
                                                                 Neighborhood(7, grid=(side, side))))
    rows = []
    for (name, pattern), (label, dtype, normalizer) in track(
            [(p, c) for p in patterns for c in CASES], description="measuring"):
        times = measure(pattern, tokens, dtype, normalizer, args.repeats)
        rows.append({"pattern": name, "tokens": tokens, "case": label, **times})
    machine = f"{torch.__version__}, {torch.get_num_threads()} threads, B=1 H=8 D=64; {native_status()}"
    lines = [f"Measured on {machine}.", "",
             "| pattern | dtype / weights | kernel fwd s | tiles fwd s | fwd kernel / tiles | kernel fwd+bwd s | "
             "tiles fwd+bwd s | fwd+bwd kernel / tiles |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['case']} | {r['kernel fwd']:.3f} | {r['tiles fwd']:.3f} | "
                     f"{r['kernel fwd'] / r['tiles fwd']:.2f} | {r['kernel fwd+bwd']:.3f} | {r['tiles fwd+bwd']:.3f} | "
                     f"{r['kernel fwd+bwd'] / r['tiles fwd+bwd']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "native_dtypes.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (args.out / "native_dtypes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
