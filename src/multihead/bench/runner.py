"""``multihead bench``: every pattern on every backend that can serve it, side by side in one run."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..backends import BACKENDS
from ..catalog import default_window, equal_documents
from ..errors import MultiheadError
from ..functional import attention
from ..patterns import Causal, Full, Pattern, PrefixLM, SlidingWindow
from ..request import make_request
from .measure import peak_memory, time_call

#: Patterns the benchmark knows, built for a sequence length.
PATTERNS: dict[str, Callable[[int], Pattern]] = {
    "full": lambda n: Full(),
    "causal": lambda n: Causal(),
    "sliding_window": lambda n: SlidingWindow(default_window(n), default_window(n)),
    "prefix_lm": lambda n: PrefixLM(max(1, n // 4)),
    "documents": lambda n: equal_documents(n) & Causal(),
}


@dataclass
class BenchSettings:
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    patterns: list[str] = field(default_factory=lambda: list(PATTERNS))
    # Compiling backends (flex) build a kernel per pattern and length: opt in with --backends.
    backends: list[str] = field(default_factory=lambda: [n for n, b in BACKENDS.items() if not b.compiles])
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 5
    seed: int = 0

    def validate(self) -> None:
        unknown = [p for p in self.patterns if p not in PATTERNS]
        if unknown:
            raise MultiheadError(f"unknown patterns {unknown}; choose from {list(PATTERNS)}")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise MultiheadError(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise MultiheadError(f"unknown dtype {self.dtype!r}; use float32, bfloat16, float16 or float64")
        if not self.lengths or any(n < 2 for n in self.lengths):
            raise MultiheadError(f"lengths must be integers >= 2, got {self.lengths}")


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _served(backend: str, *args, **kwargs) -> bool:
    return BACKENDS[backend].unsupported(make_request(*args, **kwargs)) is None


def _measure(settings: BenchSettings, pattern_name: str, backend: str, n: int) -> dict | None:
    """One cell: forward and forward+backward where the backend serves them (None otherwise)."""
    dtype = getattr(torch, settings.dtype)
    gen = torch.Generator().manual_seed(settings.seed)
    shape = (settings.batch, settings.heads, n, settings.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype).to(settings.device) for _ in range(3))
    pattern = PATTERNS[pattern_name](n)
    grad = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    serves_forward = _served(backend, q, k, v, pattern=pattern)
    serves_training = _served(backend, *leaves, pattern=pattern)
    if not (serves_forward or serves_training):
        return None

    def forward():
        with torch.no_grad():
            attention(q, k, v, pattern=pattern, backend=backend)

    def forward_backward():
        for t in leaves:
            t.grad = None
        attention(*leaves, pattern=pattern, backend=backend).backward(grad)

    row = {"pattern": pattern_name, "backend": backend, "length": n, "density": pattern.density(n, n),
           "forward_s": None, "forward_backward_s": None,
           "forward_peak_bytes": None, "forward_backward_peak_bytes": None}
    if serves_forward:
        row["forward_s"] = asdict(time_call(forward, repeats=settings.repeats, budget_s=5.0))
        row["forward_peak_bytes"] = peak_memory(forward, settings.device)
    if serves_training:
        row["forward_backward_s"] = asdict(time_call(forward_backward, repeats=settings.repeats, budget_s=10.0))
        row["forward_backward_peak_bytes"] = peak_memory(forward_backward, settings.device)
    return row


def run_bench(settings: BenchSettings, out_dir: str | Path | None = None,
              console: Console | None = None) -> dict:
    """Measure every (pattern, backend, length); print a table; write ``bench.json`` to ``out_dir``."""
    settings.validate()
    console = console or Console(width=None if Console().is_terminal else 120)
    cells = [(p, b, n) for n in settings.lengths for p in settings.patterns for b in settings.backends]
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cells))
        for p, b, n in cells:
            progress.update(task, description=f"{p} / {b} / N={n}")
            row = _measure(settings, p, b, n)
            if row is not None:
                rows.append(row)
            progress.advance(task)
    result = {"machine": _machine(), "settings": asdict(settings), "rows": rows}
    console.print(_table(rows, settings))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2))
        console.print(f"results written to {out / 'bench.json'}")
    return result


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _ms(timing: dict | None) -> str:
    return "n/a" if timing is None else f"{timing['median'] * 1e3:.1f}"


def _table(rows: list[dict], settings: BenchSettings) -> Table:
    table = Table(title=f"attention, B={settings.batch} H={settings.heads} D={settings.head_dim} "
                        f"{settings.dtype} on {settings.device} ({torch.get_num_threads()} threads); "
                        f"median of repeats, ms; n/a: the backend does not serve it")
    for column in ("pattern", "N", "backend", "pairs", "fwd ms", "fwd+bwd ms", "fwd MiB", "fwd+bwd MiB"):
        table.add_column(column, justify="left" if column in ("pattern", "backend") else "right")
    for r in rows:
        table.add_row(r["pattern"], str(r["length"]), r["backend"], f"{r['density']:.1%}",
                      _ms(r["forward_s"]), _ms(r["forward_backward_s"]),
                      _mib(r["forward_peak_bytes"]), _mib(r["forward_backward_peak_bytes"]))
    return table
