"""``multihead bench``: every catalog variant, and its peers, timed side by side in one run.

For each variant (``catalog.build(dim, heads, length)``, a module on ``(batch, length, dim)``) and
each length: forward time (under ``no_grad``), forward+backward time, the peak memory of each, and
the achieved GFLOP/s - the FLOPs of the (query, key) pairs the pattern attends (``attention_flops``
of the topology times the pattern's density; forward+backward counts three times the forward, as
the backward runs two matmuls per forward one) over the median time. The peers run the same module
with its attention forced onto another backend (SDPA with the pattern as a dense mask, the naive
eager reference, NATTEN, FlexAttention), and torch's own ``nn.MultiheadAttention`` runs dense
attention at the same size. The machine's matmul GFLOP/s is measured first: the ceiling.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from .. import catalog
from ..backends import BACKENDS
from ..backends.native import cpu_name
from ..errors import MultiheadError
from ..patterns.base import Pattern
from .implementations import LABELS, TORCH_DENSE, TorchDense, backends_used, default_peers, known, with_backend
from .measure import matmul_gflops, time_and_peak
from .readouts import READOUTS, Readout

#: Forward+backward FLOPs per forward FLOP: the backward runs two matmuls per forward matmul.
BACKWARD_FACTOR = 3
#: The variant name of the ``torch.nn.MultiheadAttention`` rows.
TORCH_VARIANT = "nn.MultiheadAttention"


@dataclass
class BenchSettings:
    """What ``multihead bench`` measures. The defaults are ``make demo``'s (well under a minute on an
    idle 2-core machine, many more on a busy one): square lengths, so the 2-D variants run on
    16 x 16, 24 x 24 and 32 x 32 grids."""

    lengths: list[int] = field(default_factory=lambda: [256, 576, 1024])
    #: Variant names or families of the catalog (empty: every variant).
    only: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=default_peers)
    batch: int = 1
    dim: int = 128
    heads: int = 4
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    seed: int = 0
    #: Seconds of timed runs after which a measurement stops repeating (after at least one run).
    budget_s: float = 1.0

    def variants(self) -> list[catalog.Variant]:
        """The catalog variants selected by ``only`` (names or families), in catalog order."""
        families = {v.family for v in (*catalog.CATALOG.values(), *READOUTS.values())}
        unknown = [n for n in self.only if n not in catalog.CATALOG and n not in READOUTS and n not in families]
        if unknown:
            raise MultiheadError(f"--only: unknown variants or families {unknown}; choose from the variants "
                                 f"{list(catalog.CATALOG)}, the read-out and cross modules {list(READOUTS)} or "
                                 f"the families {sorted(families)}")
        return [v for v in catalog.CATALOG.values() if not self.only or v.name in self.only or v.family in self.only]

    def readouts(self) -> list[Readout]:
        """The read-out and cross modules selected by ``only`` (``bench.readouts``; all without it)."""
        return [r for r in READOUTS.values() if not self.only or r.name in self.only or r.family in self.only]

    def validate(self) -> None:
        self.variants()
        unknown = [p for p in self.peers if p not in known()]
        if unknown:
            raise MultiheadError(f"--peers: unknown peers {unknown}; choose from {known()}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise MultiheadError(f"--dtype: unknown dtype {self.dtype!r}; use float32, bfloat16, float16 or float64")
        if not self.lengths or any(n < 2 for n in self.lengths):
            raise MultiheadError(f"--lengths must be integers >= 2, got {self.lengths}")
        for name in ("batch", "dim", "heads", "repeats"):
            if getattr(self, name) < 1:
                raise MultiheadError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise MultiheadError(f"--dim ({self.dim}) must be divisible by --heads ({self.heads})")


def versions() -> dict:
    """Versions of what the timings depend on (None: not installed)."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("multihead", "numpy", "natten"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_name() or None, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def pattern_density(module: nn.Module, length: int) -> float | None:
    """Fraction of the pairs the module's pattern attends (1 without one); None for dynamic
    patterns (chosen from q and k at run time) and modules without a pattern."""
    if not hasattr(module, "pattern"):
        return None
    pattern = module.pattern
    if pattern is None:
        return 1.0
    if not isinstance(pattern, Pattern) or pattern.dynamic:
        return None
    return pattern.density(length, length)


def attended_flops(module: nn.Module, length: int, batch: int) -> int | None:
    """Forward FLOPs of the attention matmuls over the pairs attended, for ``batch`` sequences;
    None where the module has no cost method or its pattern is dynamic."""
    from ..heads.base import costs_of

    density = pattern_density(module, length)
    try:
        flops = costs_of(module, length)["attention_flops"]
    except TypeError:
        return None
    return None if density is None else round(batch * flops * density)


def _failure(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:200]


class _Case:
    """One module at one length: its inputs, and its forward and forward+backward calls."""

    def __init__(self, module: nn.Module, settings: BenchSettings, length: int):
        dtype = getattr(torch, settings.dtype)
        self.device = torch.device(settings.device)
        self.module = module.to(self.device, dtype)
        gen = torch.Generator().manual_seed(settings.seed)
        shape = (settings.batch, length, settings.dim)
        self.x = torch.randn(shape, generator=gen, dtype=dtype).to(self.device)
        self.grad = torch.randn(shape, generator=gen, dtype=dtype).to(self.device)
        self.x_leaf = self.x.clone().requires_grad_()
        self.seed = settings.seed

    def forward(self):
        with torch.no_grad():
            self.module(self.x)

    def forward_backward(self):
        self.module.zero_grad(set_to_none=True)
        self.x_leaf.grad = None
        out = self.module(self.x_leaf)
        if out.shape != self.grad.shape:  # a read-out module: a gradient of its own output's shape, once
            gen = torch.Generator().manual_seed(self.seed + 1)
            self.grad = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(self.device)
        out.backward(self.grad)


def _measure(case: _Case, settings: BenchSettings) -> dict:
    """Forward and forward+backward of ``case``: a first call (which may compile, and tells whether
    the implementation serves it), then timed repeats and the peak memory."""
    row = {"backends": [], "note": ""}
    notes = []
    for mode, call, budget in (("forward", case.forward, settings.budget_s),
                               ("forward_backward", case.forward_backward, 2 * settings.budget_s)):
        row[f"{mode}_s"] = row[f"{mode}_peak_bytes"] = None
        try:
            with backends_used() as used:
                call()
        except Exception as error:  # noqa: BLE001 - a peer that cannot serve is a result, not a crash
            notes.append(f"{mode.replace('_', '+')}: {_failure(error)}")
            continue
        row["backends"] = sorted(set(row["backends"]) | used)
        timing, row[f"{mode}_peak_bytes"] = time_and_peak(call, case.device, repeats=settings.repeats,
                                                          budget_s=budget)
        row[f"{mode}_s"] = asdict(timing)
    row["note"] = "; ".join(notes)
    return row


def _cases(settings: BenchSettings):
    """``(variant name, family, length, builder)`` for every variant and length, and the torch
    baseline at each length when it is among the peers."""
    for length in settings.lengths:
        if TORCH_DENSE in settings.peers:
            yield TORCH_VARIANT, "peer", length, lambda n: TorchDense(settings.dim, settings.heads)
        for v in (*settings.variants(), *settings.readouts()):
            yield v.name, v.family, length, lambda n, v=v: v.build(settings.dim, settings.heads, n)


def run_bench(settings: BenchSettings, out_dir: str | Path | None = None,
              console: Console | None = None) -> dict:
    """Measure every selected variant with its peers at every length; print a table; write
    ``bench.json`` and the plots to ``out_dir``. Returns what ``bench.json`` holds."""
    from .report import table, write_outputs

    settings.validate()
    console = console or Console(width=None if Console().is_terminal else 140)
    dtype = getattr(torch, settings.dtype)
    gflops, matmul_timing = matmul_gflops(1024, dtype, settings.device)
    console.print(f"matmul ceiling: {gflops:.1f} GFLOP/s (1024 x 1024 {settings.dtype} on {settings.device}, "
                  f"{torch.get_num_threads()} threads)")
    cases = list(_cases(settings))
    rows, skipped = [], []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with torch.random.fork_rng(devices=[]), Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cases))
        for name, family, length, build in cases:
            progress.update(task, description=f"{name} N={length}")
            torch.manual_seed(settings.seed)
            try:
                module = build(length)
            except (ValueError, TypeError) as error:  # e.g. a 2-D variant at a non-square length
                skipped.append({"variant": name, "length": length, "reason": _failure(error)})
                progress.advance(task)
                continue
            implementations = [TORCH_DENSE] if name == TORCH_VARIANT else ["auto", *(
                p for p in settings.peers if p != TORCH_DENSE)]
            case = _Case(module, settings, length)
            flops = attended_flops(module, length, settings.batch) if name != TORCH_VARIANT else (
                settings.batch * 4 * length * length * settings.dim)
            density = pattern_density(module, length) if name != TORCH_VARIANT else 1.0
            auto_backends = None
            for impl in implementations:
                if impl not in ("auto", TORCH_DENSE) and not with_backend(module, impl):
                    continue  # the module does not run through multihead.attention
                if impl in BACKENDS and auto_backends == [impl]:
                    continue  # auto already ran exactly this backend
                progress.update(task, description=f"{name} N={length} {LABELS[impl]}")
                measured = _measure(case, settings)
                if impl == "auto":
                    auto_backends = measured["backends"]
                rows.append({"variant": name, "family": family, "implementation": impl, "label": LABELS[impl],
                             "length": length, "density": density, "attention_flops": flops, **measured})
            progress.advance(task)
    _derive(rows)
    result = {"machine": machine(), "versions": versions(), "settings": asdict(settings),
              "matmul_ceiling": {"gflops": gflops, "size": 1024, "timing": asdict(matmul_timing)},
              "conventions": {"forward_backward_flops": f"{BACKWARD_FACTOR} x forward",
                              "attention_flops": "2 x multiply-adds of q.k and weights.v over the pairs "
                                                 "attended; projections excluded"},
              "rows": rows, "skipped": skipped}
    console.print(table(result))
    if out_dir is not None:
        written = write_outputs(result, Path(out_dir))
        console.print(f"results written to {Path(out_dir).resolve()}: {', '.join(p.name for p in written)}")
    return result


def _derive(rows: list[dict]) -> None:
    """Achieved GFLOP/s of each row, and its time as a ratio of torch's dense attention at the same
    length (measured in the same run)."""
    dense = {r["length"]: r for r in rows if r["implementation"] == TORCH_DENSE}
    for r in rows:
        for mode, factor in (("forward", 1), ("forward_backward", BACKWARD_FACTOR)):
            timing = r[f"{mode}_s"]
            r[f"{mode}_gflops"] = (factor * r["attention_flops"] / timing["median"] / 1e9
                                   if timing and r["attention_flops"] else None)
            base = dense.get(r["length"], {}).get(f"{mode}_s")
            r[f"{mode}_vs_torch_dense"] = timing["median"] / base["median"] if timing and base else None
