"""Where the auto table should switch from SDPA (dense mask) to block-sparse: forward time of both
on masked 1-D patterns at growing N, side by side in one run. Prints a Markdown table.

    python benchmarks/dispatch_crossover.py --threads 2
"""

from __future__ import annotations

import argparse

import torch

import multihead as mh
from multihead.bench.measure import time_call
from multihead.patterns import Causal, Documents, PrefixLM, SlidingWindow

PATTERNS = {
    "window, distance <= N/8": lambda n: SlidingWindow(n // 8, n // 8),
    "causal window N/2": lambda n: Causal() & SlidingWindow(n // 2),
    "prefix-LM N/2": lambda n: PrefixLM(n // 2),
    "2 documents, causal": lambda n: Documents(torch.tensor([0, n // 3, n])) & Causal(),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="128,256,512,1024,2048")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| N | pattern | pairs | blocksparse ms | sdpa (dense mask) ms | ratio |")
    print("|---|---|---|---|---|---|")
    for n in map(int, args.lengths.split(",")):
        q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
        for name, make in PATTERNS.items():
            pattern = make(n)
            with torch.no_grad():
                ours, theirs = (time_call(lambda b=b: mh.attention(q, k, v, pattern=pattern, backend=b),
                                          repeats=args.repeats, warmup=2).low
                                for b in ("blocksparse", "sdpa"))
            print(f"| {n} | {name} | {pattern.density(n, n):.0%} | {ours * 1e3:.2f} | {theirs * 1e3:.2f} | "
                  f"{ours / theirs:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
