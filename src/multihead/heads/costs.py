"""The costs table of the topologies (``multihead list --costs``; the table in docs/topologies.md).

Parameters come from the built modules, FLOPs and cache sizes from their cost methods; nothing is
hard-coded. Regenerate the documented table with ``python -m multihead.heads.costs``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..readme import replace_block
from .base import costs_of

START, END = "<!-- costs:start -->", "<!-- costs:end -->"


@dataclass(frozen=True)
class CostSettings:
    dim: int = 512
    heads: int = 8
    seq_len: int = 1024
    dtype: torch.dtype = torch.bfloat16


def cost_rows(settings: CostSettings = CostSettings()) -> list[dict]:
    """One row per topology variant of the catalog, built at ``settings``."""
    from ..catalog import CATALOG

    rows = []
    torch_state = torch.random.get_rng_state()
    try:
        for variant in CATALOG.values():
            if variant.family != "topology":
                continue
            module = variant.build(settings.dim, settings.heads, settings.seq_len)
            rows.append({"variant": variant.name, "module": type(module).__name__,
                         **costs_of(module, settings.seq_len, settings.dtype)})
    finally:
        torch.random.set_rng_state(torch_state)
    base = next((r for r in rows if r["variant"] == "mha"), None)
    for r in rows:
        r["flops_vs_mha"] = r["attention_flops"] / base["attention_flops"] if base else float("nan")
        r["cache_vs_mha"] = r["kv_cache_bytes"] / base["kv_cache_bytes"] if base else float("nan")
    return rows


def _title(settings: CostSettings) -> str:
    return (f"dim={settings.dim}, heads={settings.heads}, seq_len={settings.seq_len}, "
            f"cache in {str(settings.dtype)[6:]}; attention FLOPs per sequence, Full pattern")


def markdown_costs(settings: CostSettings = CostSettings()) -> str:
    rows = cost_rows(settings)
    lines = [f"Costs at {_title(settings)}:", "",
             "| variant | module | parameters | attention GFLOPs | vs MHA | KV cache bytes/token | vs MHA | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| `{r['variant']}` | `{r['module']}` | {r['params']:,} | "
                     f"{r['attention_flops'] / 1e9:.3f} | {r['flops_vs_mha']:.3g} | {r['kv_cache_bytes']:,} | "
                     f"{r['cache_vs_mha']:.3g} | {r['note']} |")
    return "\n".join(lines)


def render(text: str, settings: CostSettings = CostSettings()) -> str:
    """``text`` with the block between the cost markers replaced by the costs table."""
    return replace_block(text, START, END, markdown_costs(settings))


def main(path: str = "docs/topologies.md") -> int:
    doc = Path(path)
    doc.write_text(render(doc.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
