"""``multihead arena``: train small models that differ only in their attention, on generated tasks,
and compare accuracy (mean and spread over seeds), training time and peak memory.

Sequence tasks (MQAR, ListOps, selective copying) train ``multihead.models.TransformerLM`` (causal)
with the loss at the positions that have a target; the image task trains
``multihead.models.VisionTransformer``. Everything is drawn from the seed: the same command gives
the same accuracies (on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from .. import catalog
from ..bench.measure import peak_memory
from ..bench.runner import machine, versions
from ..errors import MultiheadError
from ..models.vision import VisionTransformer
from .models import MODELS, build_arena_model
from .tasks import IGNORE, TASKS, Image

#: Names the arena accepts besides the catalog's.
ALIASES = {"full": "mha"}


@dataclass
class ArenaSettings:
    """What ``multihead arena`` trains. ``steps`` and ``length`` (tokens of the sequence tasks)
    default (None) to each task's own."""

    tasks: list[str] = field(default_factory=lambda: ["mqar"])
    variants: list[str] = field(default_factory=lambda: ["full", "sliding_window", "moh"])
    steps: int | None = None
    seeds: int = 2
    batch: int = 32
    dim: int = 64
    depth: int = 2
    heads: int = 4
    lr: float = 3e-3
    length: int | None = None
    train_size: int = 4096
    test_size: int = 512

    def resolved_variants(self) -> list[str]:
        names = [ALIASES.get(v, v) for v in self.variants]
        unknown = [v for v, n in zip(self.variants, names) if n not in catalog.CATALOG and n not in MODELS]
        if unknown:
            raise MultiheadError(f"--variants: unknown {unknown}; choose from {list(catalog.CATALOG)}, the "
                                 f"models {list(MODELS)} (or {', '.join(f'{a} = {n}' for a, n in ALIASES.items())})")
        return names

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise MultiheadError(f"--task: unknown tasks {unknown}; choose from {list(TASKS)}")
        self.resolved_variants()
        for name in ("steps", "seeds", "batch", "dim", "depth", "heads", "train_size", "test_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MultiheadError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise MultiheadError(f"--dim ({self.dim}) must be divisible by --heads ({self.heads})")
        if self.length is not None and self.length < 8:
            raise MultiheadError(f"--length must be >= 8, got {self.length}")


#: ``multihead arena --quick``: every task, the variants of the issue's example, each task's steps.
QUICK = ArenaSettings(tasks=["mqar", "selective_copy", "listops", "image"],
                      variants=["full", "sliding_window", "moh"], seeds=2)


def make_task(name: str, length: int | None):
    task = TASKS[name]()
    sized_by_length = "length" in {f.name for f in fields(task)}  # not the images, whose size sets it
    return replace(task, length=length) if length is not None and sized_by_length else task


def build_model(task, variant: str, settings: ArenaSettings) -> nn.Module:
    if variant in MODELS:
        return build_arena_model(variant, task, settings)
    if isinstance(task, Image):
        source = task.source
        return VisionTransformer(source.size, task.patch, settings.dim, settings.depth, settings.heads,
                                    attention=variant, in_channels=1, num_classes=source.classes)
    from ..models import TransformerLM

    return TransformerLM(task.vocab, settings.dim, settings.depth, settings.heads, attention=variant,
                         max_len=task.length)


def check_causal(model: nn.Module, task, seed: int = 0) -> None:
    """Raise a ``MultiheadError`` when the language model's output at a position changes with a later
    token: a variant that mixes tokens outside its attention pattern (e.g. a norm over all tokens)
    would read the answers of the sequence tasks from the future."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, task.vocab, (1, task.length), generator=gen)
    changed = tokens.clone()
    cut = task.length // 2
    changed[0, cut:] = (changed[0, cut:] + 1) % task.vocab
    with torch.no_grad():
        before, after = model(tokens)[0, :cut], model(changed)[0, :cut]
    if not torch.allclose(before, after, rtol=1e-4, atol=1e-5):
        raise MultiheadError("not causal: outputs change with later tokens (the variant mixes tokens outside "
                             "its attention pattern), so it cannot be scored on a language-model task")


def _loss(model: nn.Module, task, inputs, targets):
    logits = model(inputs)
    if isinstance(task, Image):
        return nn.functional.cross_entropy(logits, targets)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def accuracy(model: nn.Module, task, inputs, targets, batch: int = 256) -> float:
    """Fraction of targets predicted right (every target position of the sequence tasks; every
    image)."""
    model.eval()
    correct = total = 0
    for start in range(0, len(inputs), batch):
        x, y = inputs[start:start + batch], targets[start:start + batch]
        predicted = model(x).argmax(-1)
        asked = y != IGNORE
        correct += (predicted[asked] == y[asked]).sum().item()
        total += asked.sum().item()
    model.train()
    return correct / total


def train_one(task, variant: str, seed: int, settings: ArenaSettings) -> dict:
    """Train one model from ``seed`` and score it on the held-out set."""
    (train_x, train_y), (test_x, test_y) = task.datasets(settings.train_size, settings.test_size, seed)
    steps = settings.steps or task.steps
    torch.manual_seed(seed)
    model = build_model(task, variant, settings)
    if not isinstance(task, Image):
        check_causal(model, task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, step / steps))))
    order = torch.Generator().manual_seed(seed)
    losses = []

    def train():
        model.train()
        for _ in range(steps):
            picked = torch.randint(0, len(train_x), (settings.batch,), generator=order)
            loss = _loss(model, task, train_x[picked], train_y[picked])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())

    start = time.perf_counter()
    peak = peak_memory(train)
    seconds = time.perf_counter() - start
    return {"seed": seed, "steps": steps, "accuracy": accuracy(model, task, test_x, test_y), "train_s": seconds,
            "peak_bytes": peak, "final_loss": statistics.fmean(losses[-10:]),
            "parameters": sum(p.numel() for p in model.parameters())}


def _summary(runs: list[dict]) -> dict:
    accuracies = [r["accuracy"] for r in runs]
    peaks = [r["peak_bytes"] for r in runs if r["peak_bytes"] is not None]
    return {"accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracy_min": min(accuracies), "accuracy_max": max(accuracies),
            "train_s_mean": statistics.fmean(r["train_s"] for r in runs),
            "peak_bytes_max": max(peaks) if peaks else None, "parameters": runs[0]["parameters"]}


def _describe(task) -> dict:
    described = asdict(task)
    if isinstance(task, Image):
        described["data"] = type(task.source).__name__
    return described


@contextlib.contextmanager
def _flushing_denormals():
    """Denormal floats flushed to zero inside (torch's default, off, restored on the way out): late
    in training they made CPU math ~7x slower (full attention on MQAR: 174 s per run against 24 s
    flushed, with the same accuracy)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def run_arena(settings: ArenaSettings, out_dir: str | Path | None = None,
              console: Console | None = None) -> dict:
    """Train every (task, variant, seed); print a table; write ``arena.json`` and ``arena.png`` to
    ``out_dir``. Returns what ``arena.json`` holds."""
    from .report import table, write_outputs

    settings.validate()
    console = console or Console(width=None if Console().is_terminal else 140)
    variants = settings.resolved_variants()
    tasks, skipped = [], []
    for name in settings.tasks:
        tasks.append(make_task(name, settings.length))
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with _flushing_denormals(), torch.random.fork_rng(devices=[]), \
            Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("training", total=len(tasks) * len(variants) * settings.seeds)
        for task in tasks:
            for variant in variants:
                runs = []
                for seed in range(settings.seeds):
                    progress.update(bar, description=f"{task.name} / {variant} / seed {seed}")
                    try:
                        runs.append(train_one(task, variant, seed, settings))
                    except (ValueError, TypeError) as error:  # e.g. a 2-D variant on a non-square length
                        skipped.append({"task": task.name, "variant": variant,
                                        "reason": f"{type(error).__name__}: {error}"[:200]})
                        progress.advance(bar, settings.seeds - seed)
                        break
                    progress.advance(bar)
                if len(runs) == settings.seeds:
                    rows.append({"task": task.name, "variant": variant, "chance": task.chance,
                                 "task_settings": _describe(task), **_summary(runs),
                                 "runs": runs})
    result = {"machine": machine(), "versions": versions(), "settings": asdict(settings), "rows": rows,
              "skipped": skipped}
    console.print(table(result))
    if out_dir is not None:
        written = write_outputs(result, Path(out_dir))
        console.print(f"results written to {Path(out_dir).resolve()}: {', '.join(p.name for p in written)}")
    return result
