"""Timing and peak-memory measurement for the benchmark."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from multihead.backends import native


@dataclass(frozen=True)
class Timing:
    """Median and spread (min, max) of repeated runs, and the runs themselves, in seconds."""

    median: float
    low: float
    high: float
    runs: int
    samples: tuple[float, ...] = ()


def _timed(fn: Callable[[], object], samples: list[float]) -> Callable[[], None]:
    """``fn``, appending its duration (device synchronised) to ``samples`` on every call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def run():
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)

    return run


def _timing(samples: list[float]) -> Timing:
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples), tuple(samples))


def time_call(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              budget_s: float | None = None) -> Timing:
    """Run ``fn`` ``warmup`` times, then up to ``repeats`` times (stopping early once ``budget_s``
    seconds have been spent on the timed runs, after at least one)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    run = _timed(fn, samples)
    for _ in range(repeats):
        run()
        if budget_s is not None and sum(samples) > budget_s:
            break
    return _timing(samples)


def time_interleaved(fns: dict, *, repeats: int = 5, warmup: int = 1, budget_s: float | None = None) -> dict:
    """Time several functions (``{name: fn}``, any hashable names) in rounds, each once per round, so that a machine whose speed
    drifts (a shared or throttled CPU) slows them alike and their ratios stay fair. ``warmup``
    rounds first; then up to ``repeats`` rounds, stopping once ``budget_s`` seconds have gone
    into timed rounds (after at least one)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict = {name: [] for name in fns}
    runs = {name: _timed(fn, samples[name]) for name, fn in fns.items()}
    for _ in range(repeats):
        for run in runs.values():
            run()
        if budget_s is not None and sum(map(sum, samples.values())) > budget_s:
            break
    return {name: _timing(s) for name, s in samples.items()}


def time_and_peak(fn: Callable[[], object], device: torch.device | str = "cpu", *, repeats: int = 5,
                  budget_s: float | None = None) -> tuple[Timing, int | None]:
    """``time_call`` (no warm-up: call ``fn`` once before) and ``peak_memory`` in one go: the first
    timed run is the one whose peak memory is read, so a slow ``fn`` runs ``repeats`` times, not
    ``repeats + 1``."""
    samples: list[float] = []
    run = _timed(fn, samples)
    peak = peak_memory(run, device)
    while len(samples) < repeats and (budget_s is None or sum(samples) <= budget_s):
        run()
    return _timing(samples), peak


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    # The young generations hold what the previous measurement left behind; a full collection
    # walks every object torch imported (about a second each time here) for nothing.
    gc.collect(1)
    native.release_memory()  # the block-sparse kernel's idle output buffers
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Peak memory in bytes that ``fn`` adds above what was in use before it ran.

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the resident-set high-water mark (Linux
    ``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set before the call;
    None where the kernel offers neither.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _read_status_kib("VmRSS")
    fn()
    peak = _read_status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) * 1024


def matmul_gflops(size: int = 1024, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  repeats: int = 5) -> tuple[float, Timing]:
    """The machine's dense matmul throughput: ``2 size^3`` FLOPs of a square ``size x size`` product
    over its median time, in GFLOP/s (the ceiling an attention's achieved GFLOP/s compares with)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    timing = time_call(lambda: a @ b, repeats=repeats, warmup=2)
    return 2 * size**3 / timing.median / 1e9, timing
