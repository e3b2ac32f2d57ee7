"""Timing and peak-memory measurement for the benchmark."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Median and spread (min, max) of repeated runs, in seconds."""

    median: float
    low: float
    high: float
    runs: int


def time_call(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              budget_s: float | None = None) -> Timing:
    """Run ``fn`` ``warmup`` times, then up to ``repeats`` times (stopping early once ``budget_s``
    seconds have been spent on the timed runs, after at least one)."""
    for _ in range(warmup):
        fn()
    samples = []
    spent = 0.0
    for _ in range(repeats):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
        if budget_s is not None and spent > budget_s:
            break
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


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
    gc.collect()
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
