"""Costs of the topologies: computed from the modules, printed by ``multihead list --costs``, written
into docs/topologies.md, and the headline reductions (SQA's FLOPs, MLA's cache, CCA's everything)
equal to their formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multihead import catalog
from multihead.cli import main
from multihead.heads.costs import CostSettings, cost_rows, markdown_costs, render

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = CostSettings(dim=256, heads=8, seq_len=128)


@pytest.fixture(scope="module")
def rows():
    return {r["variant"]: r for r in cost_rows(SETTINGS)}


def test_every_topology_variant_has_a_row_with_module_figures(rows):
    topologies = [v.name for v in catalog.CATALOG.values() if v.family == "topology"]
    assert list(rows) == topologies
    assert {"mha", "moh", "sqa", "mla", "cca", "ccgqa", "low_rank", "single_head", "talking_heads"} <= set(rows)
    for name, row in rows.items():
        module = catalog.get(name).build(SETTINGS.dim, SETTINGS.heads, SETTINGS.seq_len)
        assert row["params"] == sum(p.numel() for p in module.parameters())
        assert row["attention_flops"] > 0 and row["kv_cache_bytes"] > 0


def test_headline_reductions_follow_the_formulas(rows):
    d, h, n = SETTINGS.dim // SETTINGS.heads, SETTINGS.heads, SETTINGS.seq_len
    mha = rows["mha"]
    assert mha["attention_flops"] == 2 * h * n * n * 2 * d and mha["kv_cache_bytes"] == 2 * h * d * 2
    sqa = catalog.get("sqa").build(SETTINGS.dim, h, n)
    assert rows["sqa"]["flops_vs_mha"] == sqa.query_heads / h == 0.5  # FLOPs x H_q / H
    mla = catalog.get("mla").build(SETTINGS.dim, h, n)
    assert rows["mla"]["kv_cache_bytes"] == (mla.kv_rank + mla.rope_dim) * 2  # latent + rotary key
    assert rows["mla"]["cache_vs_mha"] == pytest.approx((4 * d + d / 2) / (2 * h * d))
    assert rows["cca"]["flops_vs_mha"] == rows["cca"]["cache_vs_mha"] == 1 / 4  # compression 4
    assert rows["gqa"]["cache_vs_mha"] == 1 / 4 and rows["mqa"]["cache_vs_mha"] == 1 / h


def test_list_costs_prints_every_topology(capsys):
    assert main(["list", "--costs", "--dim", "64", "--heads", "4", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("mha", "moh", "sqa", "mla", "cca", "ccgqa"))
    assert "16,640" in out  # the MHA's parameters: 4 x (64 x 64 + 64)
    assert main(["list", "--costs", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == markdown_costs()


def test_costs_do_not_disturb_the_random_stream():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    cost_rows(SETTINGS)
    torch.testing.assert_close(torch.rand(3), expected)


def test_docs_table_is_generated_from_the_modules():
    text = (ROOT / "docs" / "topologies.md").read_text()
    assert render(text) == text, "docs/topologies.md costs table is stale: run `python -m multihead.heads.costs`"
