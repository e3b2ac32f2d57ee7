"""Where the auto table should switch from SDPA (dense mask) to block-sparse: forward time of both
on masked 1-D patterns at growing N, side by side in one run. Prints a Markdown table.

    python benchmarks/dispatch_crossover.py --threads 2
    python benchmarks/dispatch_crossover.py --key-lists 16,64   # TopK's key lists, fwd and fwd+bwd

With ``--key-lists``, each ``k`` given is a ``TopK(k)`` resolved once per N (the selection is not
timed: it is the same whichever backend attends), and both backends attend its key lists, forward
and forward+backward, in interleaved rounds; the table gives N / k, where the crossover lies.
"""

from __future__ import annotations

import argparse

import torch

import multihead as mh
from multihead.bench.measure import time_call, time_interleaved
from multihead.patterns import Causal, Documents, PrefixLM, SlidingWindow, TopK
from multihead.request import make_request

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
    parser.add_argument("--key-lists", default="",
                        help="comma-separated k of TopK(k): time its key lists instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.key_lists:
        return key_lists(args, [int(k) for k in args.key_lists.split(",")])
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


def key_lists(args, ks: list[int]) -> int:
    print("| N | k | N / k | blocksparse fwd ms | sdpa fwd ms | ratio | blocksparse fwd+bwd ms | "
          "sdpa fwd+bwd ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in map(int, args.lengths.split(",")):
        q, k, v = (torch.randn(1, 8, n, 64, requires_grad=True) for _ in range(3))
        for keep in (keep for keep in ks if keep < n):
            pattern = make_request(q, k, v, pattern=TopK(keep)).pattern  # the KeySelection

            def forward(b):
                with torch.no_grad():
                    mh.attention(q, k, v, pattern=pattern, backend=b)

            def train(b):
                mh.attention(q, k, v, pattern=pattern, backend=b).sum().backward()

            runs = {(kind, b): (lambda f=f, b=b: f(b))
                    for kind, f in (("fwd", forward), ("train", train)) for b in ("blocksparse", "sdpa")}
            times = time_interleaved(runs, repeats=args.repeats, warmup=1)
            ms = {key: t.low * 1e3 for key, t in times.items()}
            cells = [f"{ms[(kind, 'blocksparse')]:.2f} | {ms[(kind, 'sdpa')]:.2f} | "
                     f"{ms[(kind, 'blocksparse')] / ms[(kind, 'sdpa')]:.2f}" for kind in ("fwd", "train")]
            print(f"| {n} | {keep} | {n // keep} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
